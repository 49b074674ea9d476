//! Logs: to `pluginLogFile` when configured (at `pluginLogLevel`, with warnings and errors
//! also on stderr), otherwise to stderr at `pluginLogLevel`. Never to stdout, which carries
//! the CNI result.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{DEFAULT_FILE_LOG_LEVEL, DEFAULT_STDERR_LOG_LEVEL, PluginConfig};

/// Install the global subscriber. Before the configuration is known (or when it is invalid),
/// `cfg` is `None`: warnings to stderr.
///
/// With `pluginLogFile`: the file gets `pluginLogLevel` (default info), stderr warnings and
/// errors. Without it: stderr gets `pluginLogLevel` (default warn).
pub fn init(cfg: Option<&PluginConfig>) {
    let configured = cfg.and_then(|c| c.log_level);
    let file = cfg.and_then(|c| c.log_file.as_ref()).and_then(|path| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "vpc-cni: cannot open pluginLogFile {}: {e}; logging to stderr",
                    path.display()
                );
                None
            }
        }
    });
    let level = configured.unwrap_or(DEFAULT_FILE_LOG_LEVEL);
    let stderr_level = if file.is_some() {
        level.min(LevelFilter::WARN)
    } else {
        configured.unwrap_or(DEFAULT_STDERR_LOG_LEVEL)
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_filter(stderr_level);
    let file = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(Mutex::new(f))
            .with_ansi(false)
            .with_target(false)
            .with_filter(level)
    });
    // Fails only if a subscriber is already installed (tests): keep that one.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}
