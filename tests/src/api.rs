//! The gateway's and the rules engine's public API as the tests use it, in one place: when
//! their modules move, only the paths here change.

use serde_json::Value;

use crate::TIMEOUT;

pub use rules::bucket::bucket;
pub use rules::load as load_rules;
pub use rules::model::RedisSettings;
pub use tidegate::control::config::read_config;
pub use tidegate::control::reload::{ReloadOutcome, Reloader};
pub use tidegate::govern::cluster::{ClusterStore, Grant};
pub use tidegate::{Server, start_from_file};

/// Load `config` and start an in-process gateway; panics with the located errors if the
/// config is refused.
pub async fn start_gateway(config: &Value) -> Server {
    let bytes = serde_json::to_vec_pretty(config).expect("a Value serializes");
    let loaded = load_rules("test.json", &bytes).unwrap_or_else(|e| panic!("config:\n{e}"));
    tokio::time::timeout(TIMEOUT, tidegate::start(loaded))
        .await
        .expect("the gateway starts in time")
        .expect("the gateway starts")
}

/// Apply the config just written, as a reload now. The file watcher may have applied it
/// first (its debounce is 40 ms, and a busy machine can delay this call longer), so the
/// content being live already counts: the outcome is `Applied` or `Unchanged`, and no
/// error is reported.
pub async fn apply_written(reloader: &std::sync::Arc<Reloader>) {
    let outcome = reloader.reload("test", std::time::Instant::now()).await;
    let status = reloader.status();
    assert!(
        matches!(outcome, ReloadOutcome::Applied | ReloadOutcome::Unchanged)
            && status.last_error.is_none(),
        "the written config is not live: {outcome:?} {status:?}"
    );
}
