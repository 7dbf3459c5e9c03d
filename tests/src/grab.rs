//! The grab backend in tests: a small HTTP/1 client over one connection, an in-process
//! server on port 0, the standalone binary as a child process that is killed on drop, the
//! crash workload, and the hot-envelope race with the checks its answers must pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// One HTTP/1.1 keep-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Conn {
    /// Connect to `addr` and complete the HTTP/1.1 handshake.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, addr })
    }

    /// Send one request; returns the status and the JSON body (Null if empty
    /// or not JSON).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.sender.ready().await?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(u) = user {
            req = req.header("x-user-id", u);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let resp = self
            .sender
            .send_request(req.body(Full::new(bytes))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// Send one request with extra headers and a raw body; returns the status and the
    /// raw response body.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, http::HeaderValue::from_bytes(value)?);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .sender
            .send_request(req.body(Full::new(Bytes::copy_from_slice(body)))?)
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// `POST /envelopes` with `Idempotency-Key: key`; the status and the raw body.
    pub async fn create_with_key(
        &mut self,
        body: &Value,
        key: &str,
    ) -> anyhow::Result<(u16, Bytes)> {
        let body = serde_json::to_vec(body)?;
        self.send(
            "POST",
            "/envelopes",
            &[("idempotency-key", key.as_bytes())],
            &body,
        )
        .await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request("GET", path, None, None).await
    }

    /// `POST /envelopes` with a JSON body.
    pub async fn create(&mut self, body: Value) -> anyhow::Result<(u16, Value)> {
        self.request("POST", "/envelopes", None, Some(&body)).await
    }

    /// `POST /envelopes/{id}/grab` as `user` (header `x-user-id`).
    pub async fn grab(&mut self, id: &str, user: &str) -> anyhow::Result<(u16, Value)> {
        self.request("POST", &format!("/envelopes/{id}/grab"), Some(user), None)
            .await
    }

    /// All grabs of an envelope, following pages.
    pub async fn envelope_all(&mut self, id: &str) -> anyhow::Result<(u16, Value, Vec<Value>)> {
        let mut grabs = Vec::new();
        let mut first = Value::Null;
        loop {
            let (status, page) = self
                .get(&format!("/envelopes/{id}?offset={}&limit=500", grabs.len()))
                .await?;
            if status != 200 {
                return Ok((status, page, grabs));
            }
            let items = page["grabs"].as_array().cloned().unwrap_or_default();
            let done = items.len() < 500;
            grabs.extend(items);
            if first.is_null() {
                first = page;
            }
            if done {
                return Ok((200, first, grabs));
            }
        }
    }
}

/// An in-process backend on 127.0.0.1:0 over a temporary directory.
pub struct InProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Serve `config` on `127.0.0.1:0`; returns once `/healthz` answers.
    pub async fn start(config: grab_backend::Config) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(grab_backend::serve(listener, config, async move {
            let _ = rx.await;
        }));
        let server = Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        };
        wait_healthy(addr, Duration::from_secs(10)).await?;
        Ok(server)
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .context("serve did not stop")??
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Poll `/healthz` until it answers 200.
pub async fn wait_healthy(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut c) = Conn::connect(addr).await
            && let Ok((200, _)) = c.get("/healthz").await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} not healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until settlement has applied everything appended (`/stats` says
/// `settled`); returns the stats.
pub async fn wait_settled(addr: SocketAddr, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    let mut c = Conn::connect(addr).await?;
    loop {
        let (status, stats) = c.get("/stats").await?;
        if status == 200 && stats["settled"] == Value::Bool(true) {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            bail!("settlement did not catch up within {within:?}: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The standalone `grab-backend` binary of this build profile, built on first use.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| crate::workspace_bin("grab-backend", "grab-backend"))
}

/// The standalone backend as a child process; SIGKILLed on drop.
pub struct Backend {
    child: Option<Child>,
    /// Where it listens (from its `listening on` line).
    pub addr: SocketAddr,
}

impl Backend {
    /// Start `grab-backend --data-dir DIR --listen 127.0.0.1:0 ARGS` and wait
    /// for its `listening on` line and a healthy `/healthz`.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning grab-backend")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut backend = Self {
            child: Some(child),
            addr: "127.0.0.1:0".parse()?,
        };
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .context("no `listening on` line within 30s")???;
        backend.addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        wait_healthy(backend.addr, Duration::from_secs(30)).await?;
        Ok(backend)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("did not exit within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tiny deterministic PRNG (xorshift64*), so the tests need no RNG crate
/// and a failing seed can be replayed.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Seeded from the variable `var` when set (to replay a failure), else from the clock;
    /// returns the seed too, for the log.
    pub fn from_env_or_time(var: &str) -> (Self, u64) {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        (Self::new(seed), seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

// === the crash workload (shared by the embedded and Redis crash tests) ===

/// Users the crash workload grabs as (`u0`..).
pub const USERS: u64 = 200;
/// Senders the crash workload creates as (`s0`..).
pub const SENDERS: u64 = 8;

/// What clients saw acknowledged, across all rounds.
#[derive(Default)]
pub struct Acked {
    /// id → (total_cents, count); numeric ids, so the last keys are the newest
    pub envelopes: BTreeMap<u64, (u64, u64)>,
    /// (envelope id, user) → amount
    pub grabs: HashMap<(String, String), u64>,
    /// Amounts a client saw for a grab that disagreed with an earlier ack.
    pub mismatches: Vec<String>,
}

/// One client: creates (10%) and grabs (90%) until the server dies or `stop`.
/// Returns 1 if it was still running when the server died.
pub async fn load(
    addr: std::net::SocketAddr,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
    worker: usize,
) -> usize {
    let mut rng = Rng::new(seed);
    let Ok(mut conn) = Conn::connect(addr).await else {
        return 0;
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let pick = {
            let a = acked.lock().unwrap();
            if a.envelopes.is_empty() || rng.range(0, 10) == 0 {
                None
            } else {
                // Prefer recent envelopes so they fill up and go empty.
                let n = a.envelopes.len() as u64;
                let i = n - 1 - rng.range(0, n.min(12));
                a.envelopes.keys().nth(i as usize).map(u64::to_string)
            }
        };
        match pick {
            None => {
                let count = rng.range(3, 40);
                let total = count * rng.range(1, 300);
                // A fifth expire in a second, so refunds race the crashes too.
                let expires = if rng.range(0, 5) == 0 { 1 } else { 3_600 };
                let sender = format!("s{}", rng.range(0, SENDERS));
                let body = json!({"sender": sender, "total_cents": total, "count": count, "expires_in_s": expires});
                match conn.create(body).await {
                    Ok((201, v)) => {
                        let id: u64 = v["id"].as_str().unwrap().parse().unwrap();
                        acked.lock().unwrap().envelopes.insert(id, (total, count));
                    }
                    Ok((status, v)) => panic!("worker {worker}: create answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
            Some(id) => {
                let user = format!("u{}", rng.range(0, USERS));
                match conn.grab(&id, &user).await {
                    Ok((200, v)) => {
                        let amount = v["amount_cents"].as_u64().unwrap();
                        let mut a = acked.lock().unwrap();
                        let prev = *a.grabs.entry((id.clone(), user.clone())).or_insert(amount);
                        if prev != amount {
                            a.mismatches
                                .push(format!("{id}/{user}: {prev} then {amount}"));
                        }
                    }
                    Ok((410, _)) => {}
                    Ok((status, v)) => panic!("worker {worker}: grab answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
        }
    }
    0
}

/// Check the recovered server against everything acknowledged so far.
pub async fn verify(addr: std::net::SocketAddr, acked: &Mutex<Acked>, round: usize) {
    let (envelopes, grabs) = {
        let a = acked.lock().unwrap();
        (a.envelopes.clone(), a.grabs.clone())
    };
    let mut by_env: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for ((id, user), amount) in grabs {
        by_env.entry(id).or_default().push((user, amount));
    }
    let mut conn = Conn::connect(addr).await.unwrap();
    for (id, (total, count)) in &envelopes {
        let id = &id.to_string();
        let (status, env, list) = conn.envelope_all(id).await.unwrap();
        assert_eq!(
            status, 200,
            "round {round}: acknowledged envelope {id} lost"
        );
        assert_eq!(
            env["total_cents"].as_u64(),
            Some(*total),
            "round {round}: envelope {id}"
        );
        assert_eq!(
            env["count"].as_u64(),
            Some(*count),
            "round {round}: envelope {id}"
        );
        let grabbed: u64 = list
            .iter()
            .map(|g| g["amount_cents"].as_u64().unwrap())
            .sum();
        let remaining = env["remaining_cents"].as_u64().unwrap();
        let refunded = env["refunded_cents"].as_u64().unwrap_or(0);
        assert_eq!(
            grabbed + remaining + refunded,
            *total,
            "round {round}: envelope {id} leaks money: {env}"
        );
        assert_eq!(
            list.len() as u64 + env["remaining_count"].as_u64().unwrap(),
            *count,
            "round {round}: {id}"
        );
        let mut seen = HashSet::new();
        let amounts: HashMap<&str, u64> = list
            .iter()
            .map(|g| {
                let u = g["user"].as_str().unwrap();
                assert!(
                    seen.insert(u),
                    "round {round}: user {u} grabbed envelope {id} twice"
                );
                (u, g["amount_cents"].as_u64().unwrap())
            })
            .collect();
        for (user, amount) in by_env.get(id).map(Vec::as_slice).unwrap_or_default() {
            assert_eq!(
                amounts.get(user.as_str()),
                Some(amount),
                "round {round}: acknowledged grab {id}/{user} of {amount} not recovered"
            );
        }
    }
}

/// After the crash workload: once settled (asked at `stats_addr`), the wallets plus what is
/// left in envelopes equal all money put in, and the wallets of every user and sender the
/// workload could touch (asked at `wallets_addr`) add up to the wallet total. Returns the
/// settled stats.
pub async fn check_money(stats_addr: SocketAddr, wallets_addr: SocketAddr) -> Value {
    let stats = wait_settled(stats_addr, Duration::from_secs(20))
        .await
        .expect("settles");
    let field = |k: &str| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {stats}"))
    };
    let (created, remaining, wallets) = (
        field("created_cents"),
        field("remaining_cents"),
        field("wallet_cents"),
    );
    assert_eq!(wallets + remaining, created, "money not conserved: {stats}");
    let mut c = Conn::connect(wallets_addr).await.expect("connects");
    let mut sum = 0;
    for u in (0..USERS)
        .map(|i| format!("u{i}"))
        .chain((0..SENDERS).map(|i| format!("s{i}")))
    {
        let (status, w) = c
            .get(&format!("/users/{u}/wallet"))
            .await
            .expect("answered");
        assert_eq!(status, 200, "{w}");
        sum += w["balance_cents"].as_u64().expect("a balance");
    }
    assert_eq!(sum, wallets, "per-user wallets do not add up to the total");
    stats
}

// === configs ===

/// The embedded store over `dir`.
pub fn embedded_config(dir: &Path) -> grab_backend::Config {
    grab_backend::Config {
        data_dir: dir.to_owned(),
        ..Default::default()
    }
}

/// The Redis store at `url`.
pub fn redis_config(url: &str) -> grab_backend::Config {
    grab_backend::Config {
        store: grab_backend::StoreKind::Redis(grab_backend::RedisStoreConfig::new(url)),
        // Unused by the Redis store; a path that must not be created proves it.
        data_dir: "/nonexistent/grab-redis".into(),
        ..Default::default()
    }
}

// === the hot-envelope race (shared by the embedded and Redis race tests) ===

/// One envelope of `count` shares and `total` cents; `users` distinct users grab it once
/// each and `repeats` of them (drawn at random) again, shuffled and dealt over
/// `connections` connections at once, so repeats race their own first grabs.
#[derive(Debug, Clone, Copy)]
pub struct Race {
    /// Distinct users.
    pub users: usize,
    /// Extra grabs by users drawn at random.
    pub repeats: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Shares of the envelope.
    pub count: u64,
    /// Cents in the envelope.
    pub total: u64,
}

/// One answer a client saw in a race.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Who grabbed.
    pub user: String,
    /// The status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

/// What a race sent and saw.
#[derive(Debug)]
pub struct RaceRun {
    /// The envelope.
    pub id: String,
    /// The user of every grab sent.
    pub sent: Vec<String>,
    /// Every answer, in no particular order.
    pub answers: Vec<Answer>,
    /// How long the grabs took.
    pub elapsed: Duration,
}

impl Race {
    /// The hot envelope: 1,000 shares of 1,000,000 cents; 2,000 users plus 500 repeats
    /// over 64 connections.
    pub const HOT: Self = Self {
        users: 2_000,
        repeats: 500,
        connections: 64,
        count: 1_000,
        total: 1_000_000,
    };

    /// Create the envelope through `addrs[0]`, then run the grabs, connection `k` going to
    /// `addrs[k % addrs.len()]`. The shuffle's seed is taken from `seed_var` when set and
    /// logged under `name`.
    pub async fn run(&self, addrs: &[SocketAddr], seed_var: &str, name: &str) -> RaceRun {
        let mut c = Conn::connect(addrs[0]).await.expect("connects");
        let (status, env) = c
            .create(json!({"sender": "boss", "total_cents": self.total,
                           "count": self.count, "expires_in_s": 600}))
            .await
            .expect("create answered");
        assert_eq!(status, 201, "{env}");
        let id = env["id"].as_str().expect("an id").to_owned();

        let (mut rng, seed) = Rng::from_env_or_time(seed_var);
        eprintln!("{name} seed {seed} ({seed_var})");
        let mut sent: Vec<String> = (0..self.users).map(|u| format!("user-{u}")).collect();
        for _ in 0..self.repeats {
            let u = rng.range(0, self.users as u64);
            sent.push(format!("user-{u}"));
        }
        for i in (1..sent.len()).rev() {
            let j = rng.range(0, i as u64 + 1) as usize;
            sent.swap(i, j);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..self.connections {
            let mine: Vec<String> = sent
                .iter()
                .skip(k)
                .step_by(self.connections)
                .cloned()
                .collect();
            let (addr, id) = (addrs[k % addrs.len()], id.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::connect(addr).await.expect("connects");
                let mut out = Vec::new();
                for user in mine {
                    let (status, body) = conn.grab(&id, &user).await.expect("grab answered");
                    out.push(Answer { user, status, body });
                }
                out
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.extend(t.await.expect("a grabbing task"));
        }
        RaceRun {
            id,
            sent,
            answers,
            elapsed: started.elapsed(),
        }
    }
}

/// What clients saw of a race, per user.
#[derive(Debug, Default)]
struct PerUser {
    sent: usize,
    /// Amounts of the 200 answers, first grabs and repeats alike.
    amounts: Vec<u64>,
    /// 200 answers with `repeat: false`.
    wins: usize,
    /// 410 `empty` answers.
    empty: usize,
}

/// Everything wrong with what clients saw of `race` (one line each; empty when it held):
/// only 200 (a share, at least a cent) and 410 `empty` answers; every grab sent answered
/// once; no user wins twice; a user's repeats return the same amount as the win; nobody
/// gets only repeats, nor a share and `empty`; at most `count` winners, and exactly `count`
/// when at least that many users tried; the shares never sum past the total, and to exactly
/// the total when the envelope is fully grabbed. Returns the winners' amounts too.
pub fn race_violations(
    race: &Race,
    sent: &[String],
    answers: &[Answer],
) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut bad = Vec::new();
    let mut users: BTreeMap<&str, PerUser> = BTreeMap::new();
    for u in sent {
        users.entry(u).or_default().sent += 1;
    }
    for Answer { user, status, body } in answers {
        let Some(seen) = users.get_mut(user.as_str()) else {
            bad.push(format!(
                "{user} was answered but never sent: {status} {body}"
            ));
            continue;
        };
        match status {
            200 => match body["amount_cents"].as_u64() {
                Some(amount) if amount >= 1 => {
                    seen.amounts.push(amount);
                    if body["repeat"] == false {
                        seen.wins += 1;
                    }
                }
                _ => bad.push(format!("{user}: 200 without a share: {body}")),
            },
            410 if body["error"] == "empty" => seen.empty += 1,
            other => bad.push(format!("{user}: unexpected {other}: {body}")),
        }
    }
    let mut winners = BTreeMap::new();
    for (user, seen) in &users {
        let answered = seen.amounts.len() + seen.empty;
        if answered != seen.sent {
            bad.push(format!(
                "{user}: sent {} grabs, {answered} answered with a share or empty",
                seen.sent
            ));
        }
        if seen.wins > 1 {
            bad.push(format!(
                "{user} won {} times: {:?}",
                seen.wins, seen.amounts
            ));
        }
        if seen.wins == 0 && !seen.amounts.is_empty() {
            bad.push(format!("{user} got only repeats: {:?}", seen.amounts));
        }
        if let Some(&first) = seen.amounts.first() {
            if seen.amounts.iter().any(|&a| a != first) {
                bad.push(format!("{user} saw different amounts: {:?}", seen.amounts));
            }
            if seen.empty > 0 {
                bad.push(format!("{user} got both a share and 'empty'"));
            }
            if seen.wins > 0 {
                winners.insert((*user).to_owned(), first);
            }
        }
    }
    let n = winners.len() as u64;
    let sum: u64 = winners.values().sum();
    if n > race.count {
        bad.push(format!("{n} winners for {} shares", race.count));
    }
    if users.len() as u64 >= race.count && n != race.count {
        bad.push(format!(
            "{} users tried, {n} of {} shares went out",
            users.len(),
            race.count
        ));
    }
    if sum > race.total || (n == race.count && sum != race.total) {
        bad.push(format!(
            "the {n} shares sum to {sum}, the envelope holds {}",
            race.total
        ));
    }
    (winners, bad)
}

/// Everything wrong with the server's view of the raced envelope (`page` and `grabs` from
/// [`Conn::envelope_all`]) against the `winners` clients saw: every winner listed once with
/// the amount the client was told, nobody else, and the remainder what is left.
pub fn envelope_violations(
    race: &Race,
    winners: &BTreeMap<String, u64>,
    page: &Value,
    grabs: &[Value],
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut listed: BTreeMap<&str, u64> = BTreeMap::new();
    for g in grabs {
        let (Some(user), Some(amount)) = (g["user"].as_str(), g["amount_cents"].as_u64()) else {
            bad.push(format!("a listed grab without user or amount: {g}"));
            continue;
        };
        if listed.insert(user, amount).is_some() {
            bad.push(format!("{user} listed twice"));
        }
        if winners.get(user) != Some(&amount) {
            bad.push(format!(
                "{user} listed with {amount}, clients saw {:?}",
                winners.get(user)
            ));
        }
    }
    for (user, amount) in winners {
        if !listed.contains_key(user.as_str()) {
            bad.push(format!("winner {user} ({amount}) is not listed"));
        }
    }
    let sum: u64 = winners.values().sum();
    let left = (
        page["remaining_count"].as_u64(),
        page["remaining_cents"].as_u64(),
    );
    let want = (
        race.count.checked_sub(winners.len() as u64),
        race.total.checked_sub(sum),
    );
    if left != want {
        bad.push(format!("remaining {left:?}, expected {want:?}: {page}"));
    }
    bad
}

/// Panics listing every violation, if any, under `what`.
pub fn assert_none(what: &str, bad: &[String]) {
    const SHOWN: usize = 30;
    assert!(
        bad.is_empty(),
        "{what}: {} violations:\n{}{}",
        bad.len(),
        bad[..bad.len().min(SHOWN)].join("\n"),
        if bad.len() > SHOWN { "\n…" } else { "" }
    );
}

#[cfg(test)]
mod tests {
    //! The race checks on small hand-made answers: each fails when its property is broken.

    use super::*;

    const RACE: Race = Race {
        users: 3,
        repeats: 1,
        connections: 1,
        count: 2,
        total: 10,
    };

    fn ans(user: &str, status: u16, body: Value) -> Answer {
        Answer {
            user: user.to_owned(),
            status,
            body,
        }
    }

    /// a wins 3 and repeats, b wins 7, c finds it empty.
    fn good() -> (Vec<String>, Vec<Answer>) {
        let sent = ["a", "b", "c", "a"].map(str::to_owned).to_vec();
        let answers = vec![
            ans("a", 200, json!({"amount_cents": 3, "repeat": false})),
            ans("b", 200, json!({"amount_cents": 7, "repeat": false})),
            ans("c", 410, json!({"error": "empty"})),
            ans("a", 200, json!({"amount_cents": 3, "repeat": true})),
        ];
        (sent, answers)
    }

    fn violations(sent: &[String], answers: &[Answer]) -> Vec<String> {
        race_violations(&RACE, sent, answers).1
    }

    #[track_caller]
    fn fails_with(bad: &[String], phrase: &str) {
        assert!(
            bad.iter().any(|b| b.contains(phrase)),
            "expected a violation with {phrase:?}, got {bad:?}"
        );
    }

    #[test]
    fn a_good_race_passes() {
        let (sent, answers) = good();
        let (winners, bad) = race_violations(&RACE, &sent, &answers);
        assert_eq!(bad, Vec::<String>::new());
        assert_eq!(winners.len(), 2);
        let page = json!({"remaining_count": 0, "remaining_cents": 0});
        let grabs = [
            json!({"user": "a", "amount_cents": 3}),
            json!({"user": "b", "amount_cents": 7}),
        ];
        assert_eq!(
            envelope_violations(&RACE, &winners, &page, &grabs),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_repeat_with_another_amount_fails() {
        let (sent, mut answers) = good();
        answers[3].body["amount_cents"] = json!(4);
        fails_with(&violations(&sent, &answers), "a saw different amounts");
    }

    #[test]
    fn a_user_winning_twice_fails() {
        let (sent, mut answers) = good();
        answers[3].body["repeat"] = json!(false);
        fails_with(&violations(&sent, &answers), "a won 2 times");
    }

    #[test]
    fn shares_not_summing_to_the_total_fail() {
        let (sent, mut answers) = good();
        answers[1].body["amount_cents"] = json!(6);
        fails_with(&violations(&sent, &answers), "sum to 9");
    }

    #[test]
    fn more_winners_than_shares_fail() {
        let (sent, mut answers) = good();
        answers[2] = ans("c", 200, json!({"amount_cents": 1, "repeat": false}));
        fails_with(&violations(&sent, &answers), "3 winners for 2 shares");
    }

    #[test]
    fn too_few_winners_fail() {
        let (sent, mut answers) = good();
        answers[1] = ans("b", 410, json!({"error": "empty"}));
        fails_with(&violations(&sent, &answers), "1 of 2 shares went out");
    }

    #[test]
    fn unanswered_unexpected_and_mixed_answers_fail() {
        let (sent, mut answers) = good();
        answers.pop();
        fails_with(&violations(&sent, &answers), "a: sent 2 grabs, 1 answered");
        let (sent, mut answers) = good();
        answers[2] = ans("c", 500, json!({}));
        fails_with(&violations(&sent, &answers), "c: unexpected 500");
        let (mut sent, mut answers) = good();
        sent.push("b".into());
        answers.push(ans("b", 410, json!({"error": "empty"})));
        fails_with(
            &violations(&sent, &answers),
            "b got both a share and 'empty'",
        );
        let (sent, mut answers) = good();
        answers[0].body["repeat"] = json!(true);
        fails_with(&violations(&sent, &answers), "a got only repeats");
    }

    #[test]
    fn a_server_view_that_disagrees_fails() {
        let (sent, answers) = good();
        let (winners, _) = race_violations(&RACE, &sent, &answers);
        let page = json!({"remaining_count": 0, "remaining_cents": 0});
        let a3 = json!({"user": "a", "amount_cents": 3});
        let b7 = json!({"user": "b", "amount_cents": 7});
        let bad = envelope_violations(
            &RACE,
            &winners,
            &page,
            &[a3.clone(), a3.clone(), b7.clone()],
        );
        fails_with(&bad, "a listed twice");
        let bad = envelope_violations(&RACE, &winners, &page, std::slice::from_ref(&a3));
        fails_with(&bad, "winner b (7) is not listed");
        let b8 = json!({"user": "b", "amount_cents": 8});
        let bad = envelope_violations(&RACE, &winners, &page, &[a3.clone(), b8]);
        fails_with(&bad, "b listed with 8");
        let left = json!({"remaining_count": 1, "remaining_cents": 0});
        fails_with(
            &envelope_violations(&RACE, &winners, &left, &[a3, b7]),
            "remaining",
        );
    }
}
