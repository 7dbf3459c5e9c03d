//! `bench-config`: print a gateway config for the peer comparison.
//!
//! ```text
//! bench-config norules|rules LISTEN ADMIN BACKEND > tidegate.json
//! ```
//!
//! `rules` is the realistic rule set of [`tidegate_benches::peer_config`].

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [kind, listen, admin, backend] = a.as_slice() else {
        anyhow::bail!("usage: bench-config norules|rules LISTEN ADMIN BACKEND");
    };
    let rules = match kind.as_str() {
        "rules" => true,
        "norules" => false,
        other => anyhow::bail!("{other:?}: norules or rules"),
    };
    print!(
        "{}",
        tidegate_benches::peer_config(rules, listen, admin, backend)
    );
    Ok(())
}
