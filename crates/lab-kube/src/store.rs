//! The objects by (resource, namespace, name), the global resourceVersion, and the bounded
//! history of changes that watches replay. The lab's direct access ([`Store`]) writes as a
//! controller of the cluster would, without the API's create/update rules (see `api`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;
use tokio::sync::watch;

use crate::Error;
use crate::resource::{Kind, Object, Resource};
use crate::status::ApiError;

/// How many changes a new [`Store`] keeps for watches to resume from.
pub const DEFAULT_HISTORY: usize = 1000;

pub(crate) type Key = (Resource, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches replay it: the object after it (for a deletion, the last state with
/// the deletion's resourceVersion) and before it.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: Resource,
    pub namespace: String,
    pub typ: ChangeType,
    pub object: Value,
    pub prev: Option<Value>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub rv: u64,
    pub objects: BTreeMap<Key, Object>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this resourceVersion is in `history`: a watch may resume from any
    /// resourceVersion at or after it.
    pub oldest: u64,
    capacity: usize,
}

pub(crate) fn key(resource: Resource, namespace: Option<&str>, name: &str) -> Key {
    (
        resource,
        namespace.unwrap_or_default().to_string(),
        name.to_string(),
    )
}

pub(crate) fn now() -> Time {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Time(
        k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or_default())
            .unwrap_or_default(),
    )
}

/// `now` plus `secs` seconds.
pub(crate) fn later(secs: i64) -> Time {
    let t = now().0;
    Time(k8s_openapi::jiff::Timestamp::from_second(t.as_second().saturating_add(secs)).unwrap_or(t))
}

/// A random version-4 UUID, as the real server gives `metadata.uid`.
pub(crate) fn new_uid() -> String {
    let n = (rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `generateName` plus five characters of the real server's alphabet.
pub(crate) fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect();
    format!("{prefix}{suffix}")
}

impl Inner {
    /// The next resourceVersion, now taken.
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Appends a change at `self.rv` and drops the oldest beyond the capacity.
    pub fn record(&mut self, typ: ChangeType, object: &Object, prev: Option<&Object>) {
        let meta = object.meta();
        let change = Change {
            rv: self.rv,
            resource: object.resource(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            typ,
            object: object.to_value(),
            prev: prev.map(Object::to_value),
        };
        tracing::debug!(
            rv = self.rv,
            resource = %change.resource,
            namespace = %change.namespace,
            name = meta.name.as_deref().unwrap_or_default(),
            change = typ.as_str(),
            "lab-kube change"
        );
        self.history.push_back(Arc::new(change));
        while self.history.len() > self.capacity {
            if let Some(gone) = self.history.pop_front() {
                self.oldest = gone.rv;
            }
        }
    }

    /// The changes after `rv`, or `Err(oldest)` when some of them are no longer kept.
    pub fn since(&self, rv: u64) -> Result<Vec<Arc<Change>>, u64> {
        if rv < self.oldest {
            return Err(self.oldest);
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Stores `object` (its resourceVersion already set) as a new object.
    pub fn insert(&mut self, k: Key, object: Object) {
        self.record(ChangeType::Added, &object, None);
        self.objects.insert(k, object);
    }

    /// Replaces `k` by `object` (its resourceVersion already set).
    pub fn replace(&mut self, k: Key, object: Object) {
        let prev = self.objects.insert(k, object.clone());
        self.record(ChangeType::Modified, &object, prev.as_ref());
    }

    /// Removes `k` at a new resourceVersion; returns its last state, with that version.
    pub fn remove(&mut self, k: &Key) -> Option<Object> {
        let mut gone = self.objects.remove(k)?;
        let rv = self.next_rv();
        gone.meta_mut().resource_version = Some(rv.to_string());
        self.record(ChangeType::Deleted, &gone, None);
        Some(gone)
    }
}

/// The lab cluster's objects. Cheap to clone: clones share the objects. One store outlives
/// any number of [`crate::Running`] servers (stop one, start another on the same address).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    tick: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Store")
            .field("resource_version", &g.rv)
            .field("objects", &g.objects.len())
            .field("history", &g.history.len())
            .field("oldest", &g.oldest)
            .finish()
    }
}

impl Default for Store {
    fn default() -> Store {
        Store::new()
    }
}

impl Store {
    /// An empty store keeping the last [`DEFAULT_HISTORY`] changes.
    pub fn new() -> Store {
        Store::with_history(DEFAULT_HISTORY)
    }

    /// An empty store keeping the last `capacity` changes for watches (at least one).
    pub fn with_history(capacity: usize) -> Store {
        Store {
            inner: Arc::new(Mutex::new(Inner {
                rv: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: 0,
                capacity: capacity.max(1),
            })),
            tick: Arc::new(watch::channel(0).0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the store and then wakes the watches if it changed anything.
    pub(crate) fn mutate<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let (out, rv) = {
            let mut g = self.lock();
            let out = f(&mut g);
            (out, g.rv)
        };
        self.tick.send_if_modified(|last| {
            let changed = *last != rv;
            *last = rv;
            changed
        });
        out
    }

    /// A receiver that changes whenever the store does.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tick.subscribe()
    }

    /// The newest resourceVersion (that of the last change).
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets the change history: a watch from any resourceVersion before now gets
    /// `410 Expired`, as after etcd's compaction. Open watches that are up to date go on.
    pub fn compact(&self) {
        let mut g = self.lock();
        g.history.clear();
        g.oldest = g.rv;
        tracing::debug!(rv = g.rv, "lab-kube history compacted");
    }

    /// Creates or replaces `object` as a cluster component would (the lab seeding nodes and
    /// ENIConfigs, a kubelet writing pods): the name and, for namespaced kinds, the namespace
    /// are required; `uid` and `creationTimestamp` are kept from the stored object or made;
    /// `resourceVersion` is the new one. The API's rules (status reset, immutable fields,
    /// preconditions) do not apply. Returns the object as stored.
    pub fn put<K: Kind>(&self, object: K) -> Result<K, Error> {
        let resource = K::RESOURCE;
        let mut object = object.into_object();
        object.set_type();
        let meta = object.meta();
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().filter(|n| !n.is_empty());
        let reject = |e: ApiError| Error::Rejected {
            code: e.code,
            reason: e.reason.to_string(),
            message: e.message,
        };
        let mut causes = Vec::new();
        if let Some(why) = crate::resource::invalid_name(&name) {
            causes.push(("metadata.name".to_string(), why));
        }
        match (resource.namespaced(), &namespace) {
            (true, None) => causes.push((
                "metadata.namespace".to_string(),
                "Required value".to_string(),
            )),
            (false, Some(ns)) => causes.push((
                "metadata.namespace".to_string(),
                format!("Invalid value: {ns:?}: {resource} are not namespaced"),
            )),
            _ => {}
        }
        if !causes.is_empty() {
            return Err(reject(ApiError::invalid(resource, &name, causes)));
        }
        let k = key(resource, namespace.as_deref(), &name);
        let stored = self.mutate(|g| {
            let rv = g.next_rv();
            let old = g.objects.get(&k).map(|o| o.meta().clone());
            let meta = object.meta_mut();
            meta.resource_version = Some(rv.to_string());
            if meta.uid.as_deref().unwrap_or_default().is_empty() {
                meta.uid = old
                    .as_ref()
                    .and_then(|m| m.uid.clone())
                    .or_else(|| Some(new_uid()));
            }
            if meta.creation_timestamp.is_none() {
                meta.creation_timestamp = old
                    .as_ref()
                    .and_then(|m| m.creation_timestamp.clone())
                    .or_else(|| Some(now()));
            }
            if resource == Resource::EniConfigs && meta.generation.is_none() {
                meta.generation = Some(old.as_ref().and_then(|m| m.generation).unwrap_or(1));
            }
            if old.is_some() {
                g.replace(k.clone(), object.clone());
            } else {
                g.insert(k.clone(), object.clone());
            }
            object
        });
        K::from_object(&stored)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("stored a {resource} as another kind")))
    }

    /// The object `name` (in `namespace` for namespaced kinds).
    pub fn get<K: Kind>(&self, namespace: Option<&str>, name: &str) -> Option<K> {
        let k = key(K::RESOURCE, namespace, name);
        self.lock()
            .objects
            .get(&k)
            .and_then(K::from_object)
            .cloned()
    }

    /// Every object of the kind, in `namespace` or (`None`) in all, by namespace then name.
    pub fn list<K: Kind>(&self, namespace: Option<&str>) -> Vec<K> {
        self.lock()
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == K::RESOURCE && namespace.is_none_or(|n| n == ns))
            .filter_map(|(_, o)| K::from_object(o).cloned())
            .collect()
    }

    /// Removes the object at once (no finalizers, no grace period); returns its last state.
    pub fn delete<K: Kind>(&self, namespace: Option<&str>, name: &str) -> Option<K> {
        let k = key(K::RESOURCE, namespace, name);
        self.mutate(|g| g.remove(&k))
            .and_then(|o| K::from_object(&o).cloned())
    }

    /// Waits until `probe` answers `Some` (it is asked now and after every change), for at
    /// most `timeout`. For tests that wait for what a client writes.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut probe: impl FnMut(&Store) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(t) = probe(self) {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return probe(self),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EniConfig;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    #[test]
    fn put_assigns_identity_and_versions_and_keeps_them_on_replace() {
        let s = Store::new();
        let a = s.put(node("n1")).expect("stored");
        assert_eq!(a.metadata.resource_version.as_deref(), Some("1"));
        let uid = a.metadata.uid.clone().expect("a uid");
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4", "version-4 UUID: {uid}");
        let b = s.put(node("n1")).expect("replaced");
        assert_eq!(b.metadata.resource_version.as_deref(), Some("2"));
        assert_eq!(b.metadata.uid, a.metadata.uid);
        assert_eq!(s.list::<Node>(None).len(), 1);
        let e = s
            .put(EniConfig::new("us-west-2a", "subnet-1", &[]))
            .expect("stored");
        assert_eq!(e.metadata.generation, Some(1));
        let bare = EniConfig {
            metadata: ObjectMeta {
                name: Some("us-west-2b".to_string()),
                ..ObjectMeta::default()
            },
            ..EniConfig::default()
        };
        let e = s.put(bare).expect("stored");
        assert_eq!(
            (e.api_version.as_str(), e.kind.as_str()),
            ("crd.k8s.amazonaws.com/v1alpha1", "ENIConfig")
        );
        assert!(s.delete::<EniConfig>(None, "us-west-2b").is_some());
        assert_eq!(s.resource_version(), 5);
        assert!(s.delete::<Node>(None, "n1").is_some());
        assert_eq!(s.resource_version(), 6);
        assert!(s.get::<Node>(None, "n1").is_none());
    }

    #[test]
    fn put_refuses_what_has_no_place() {
        let s = Store::new();
        let e = s.put(node("Bad_Name")).expect_err("bad name");
        assert!(e.to_string().contains("Bad_Name"), "{e}");
        let e = s
            .put(k8s_openapi::api::core::v1::Pod::default())
            .expect_err("no namespace");
        assert!(e.to_string().contains("metadata.namespace"), "{e}");
    }

    #[test]
    fn the_history_is_bounded_and_compactable() {
        let s = Store::with_history(2);
        for i in 0..4 {
            s.put(node(&format!("n{i}"))).expect("stored");
        }
        let g = s.lock();
        assert_eq!(g.since(1).map(|c| c.len()), Err(2));
        assert_eq!(g.since(2).map(|c| c.len()), Ok(2));
        assert_eq!(g.since(4).map(|c| c.len()), Ok(0));
        drop(g);
        s.compact();
        assert_eq!(s.lock().since(3).map(|c| c.len()), Err(4));
        assert_eq!(s.lock().since(4).map(|c| c.len()), Ok(0));
    }
}
