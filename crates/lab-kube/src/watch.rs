//! WATCH: newline-delimited `{"type": …, "object": …}` events from a resourceVersion, as the
//! real server's watch cache sends them: synthetic ADDED events for the current state when
//! asked, ADDED/DELETED when a change makes an object enter/leave the selection, BOOKMARKs,
//! an ERROR `410 Expired` when the history no longer reaches back, and the end of the stream
//! at `timeoutSeconds` or when the server stops.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::resource::Resource;
use crate::select::Selector;
use crate::status::ApiError;
use crate::store::{Change, ChangeType, Store};

/// Where a watch begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// ADDED for every selected object now, then the changes after now. With `end_bookmark`
    /// (`sendInitialEvents=true`), a BOOKMARK annotated `k8s.io/initial-events-end` follows
    /// the initial events.
    Current { end_bookmark: bool },
    /// The changes after this resourceVersion.
    After(u64),
}

/// One watch request, validated.
#[derive(Clone, Debug)]
pub(crate) struct Watch {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub start: Start,
    pub bookmarks: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
}

fn line(typ: &str, object: Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": typ, "object": object}))
        .unwrap_or_else(|e| format!(r#"{{"type":"ERROR","object":"{e}"}}"#).into_bytes());
    out.push(b'\n');
    Bytes::from(out)
}

fn bookmark(resource: Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": resource.kind(), "apiVersion": resource.api_version(), "metadata": metadata}),
    )
}

fn error_line(e: &ApiError) -> Bytes {
    line(
        "ERROR",
        serde_json::to_value(e.status()).unwrap_or_default(),
    )
}

impl Watch {
    fn in_scope(&self, resource: Resource, namespace: &str) -> bool {
        resource == self.resource && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }

    /// The event this watch sees for `c`, if any.
    fn event(&self, c: &Change) -> Option<Bytes> {
        if !self.in_scope(c.resource, &c.namespace) {
            return None;
        }
        let now = self.selector.matches(&c.object);
        match c.typ {
            ChangeType::Added => now.then(|| line("ADDED", c.object.clone())),
            ChangeType::Deleted => now.then(|| line("DELETED", c.object.clone())),
            ChangeType::Modified => {
                let before = c.prev.as_ref().is_some_and(|p| self.selector.matches(p));
                match (before, now) {
                    (true, true) => Some(line("MODIFIED", c.object.clone())),
                    (false, true) => Some(line("ADDED", c.object.clone())),
                    (true, false) => {
                        // Leaving the selection: the last selected state, at this version.
                        let mut gone = c.prev.clone().unwrap_or_default();
                        gone["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                        Some(line("DELETED", gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

struct State {
    store: Store,
    watch: Watch,
    cursor: u64,
    changes: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    deadline: Instant,
    next_bookmark: Option<Instant>,
    queue: VecDeque<Bytes>,
    done: bool,
}

enum Wake {
    End,
    Changed,
    Bookmark,
}

impl State {
    /// Queues the events of the changes after the cursor, or the 410 that ends the watch.
    fn catch_up(&mut self) {
        let g = self.store.lock();
        match g.since(self.cursor) {
            Ok(changes) => {
                for c in &changes {
                    if let Some(ev) = self.watch.event(c) {
                        self.queue.push_back(ev);
                    }
                }
                self.cursor = g.rv;
            }
            Err(oldest) => {
                tracing::debug!(cursor = self.cursor, oldest, "lab-kube watch expired");
                self.queue
                    .push_back(error_line(&ApiError::expired(self.cursor, oldest + 1)));
                self.done = true;
            }
        }
    }

    async fn wait(&mut self) -> Wake {
        let bookmark_at = self.next_bookmark;
        tokio::select! {
            _ = tokio::time::sleep_until(self.deadline) => Wake::End,
            _ = self.stop.wait_for(|stopped| *stopped) => Wake::End,
            r = self.changes.changed() => if r.is_ok() { Wake::Changed } else { Wake::End },
            _ = tokio::time::sleep_until(bookmark_at.unwrap_or(self.deadline)), if bookmark_at.is_some() => Wake::Bookmark,
        }
    }
}

/// The body of a watch response. Nothing is held between events but the cursor: a watch
/// that falls behind the retained history ends with `410 Expired`, as a real one does.
pub(crate) fn stream(
    store: Store,
    w: Watch,
    stop: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let mut changes = store.subscribe();
    changes.borrow_and_update();
    let now = Instant::now();
    let mut state = State {
        cursor: 0,
        changes,
        stop,
        deadline: now + w.timeout,
        next_bookmark: w.bookmarks.then(|| now + w.bookmark_interval),
        queue: VecDeque::new(),
        done: false,
        store,
        watch: w,
    };
    match state.watch.start {
        Start::Current { end_bookmark } => {
            let g = state.store.lock();
            for ((r, ns, _), o) in &g.objects {
                if state.watch.in_scope(*r, ns) {
                    let v = o.to_value();
                    if state.watch.selector.matches(&v) {
                        state.queue.push_back(line("ADDED", v));
                    }
                }
            }
            state.cursor = g.rv;
            if end_bookmark {
                state
                    .queue
                    .push_back(bookmark(state.watch.resource, g.rv, true));
            }
        }
        Start::After(rv) => {
            state.cursor = rv;
            state.catch_up();
        }
    }
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.queue.pop_front() {
                return Some((Ok(b), s));
            }
            if s.done {
                return None;
            }
            match s.wait().await {
                Wake::End => s.done = true,
                Wake::Changed => s.catch_up(),
                Wake::Bookmark => {
                    s.queue
                        .push_back(bookmark(s.watch.resource, s.cursor, false));
                    s.next_bookmark = Some(Instant::now() + s.watch.bookmark_interval);
                }
            }
        }
    })
}
