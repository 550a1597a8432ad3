//! Differential testing: the kernel and the policy model agree on every
//! case. A seeded generator ([`cases`]) makes random policy files over a
//! cgroup tree and random operations; the real agent enforces each file
//! (one [`Agent::reload`] per batch, so policy generations turn over); a
//! long-lived executor per cgroup (`pgprobe batch`, in a private network
//! namespace) performs the operations through real syscalls; the oracle
//! ([`oracle`], the pure policy model) predicts each answer and event. Any
//! disagreement (the syscall's EPERM or not, the number of events, an
//! event's verdict, hook, policy, rule, port or family) is shrunk to a
//! minimal policy file and operation and printed as a ready-to-paste
//! regression test ([`assert_case`]). [`coverage`] counts the cases per
//! (policy key value x hook x family) cell. Each case `portguard why` can
//! be asked about is also held against its offline judgement ([`why`]).
//!
//! Events are matched to operations by thread id: the executor runs each
//! operation in a fresh thread. A batch ends with a marker operation (a
//! bind the marker policy always denies, on a port unique to the batch):
//! once its event is in the log, so is every event of the batch before it.

pub mod cases;
mod compare;
pub mod coverage;
pub mod oracle;
mod shrink;
pub mod why;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Seek as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout},
    time::{Duration, Instant},
};

use serde_json::Value;

pub use self::compare::compare;
use self::{
    cases::{FileSpec, NODES, Op, OpKind, Rng, gen_file, gen_op, render},
    coverage::Coverage,
    oracle::{Model, Prediction, predict},
};
use crate::{Agent, Cgroup, probe_batch};

/// Name of the marker policy (see the module docs).
pub const MARKER: &str = "dt-marker";

/// One run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub cases: usize,
    pub seed: u64,
    /// Operations per policy file (one reload each).
    pub batch: usize,
    /// How many distinct disagreements to shrink.
    pub shrink: usize,
    /// Where to write the coverage table (markdown).
    pub coverage_out: Option<PathBuf>,
    /// Stop after the batch in which the first disagreement was found (for
    /// mutation checks: how many cases it took).
    pub stop_early: bool,
}

impl Config {
    pub fn new(cases: usize, seed: u64) -> Self {
        Self {
            cases,
            seed,
            batch: 200,
            shrink: 3,
            coverage_out: None,
            stop_early: false,
        }
    }
}

/// One case the kernel and the model disagree on.
#[derive(Clone, Debug)]
pub struct Disagreement {
    pub file: FileSpec,
    pub op: Op,
    pub problems: Vec<String>,
}

impl Disagreement {
    /// What kind of disagreement (for deduplication): the operation's kind,
    /// protocol, variant and the first problem's words before any value.
    fn signature(&self) -> String {
        let first = self.problems.first().map_or("", |p| {
            p.split_once(':').map_or(p.as_str(), |(head, _)| head)
        });
        format!(
            "{} {} {} port0={} {first}",
            self.op.kind.as_str(),
            self.op.proto,
            self.op.variant(),
            self.op.port == 0
        )
    }
}

/// What a run found.
pub struct Report {
    pub cases: usize,
    pub batches: usize,
    pub elapsed: Duration,
    pub disagreements: Vec<Disagreement>,
    /// How many cases ran up to and including the first disagreement.
    pub first_disagreement_at: Option<usize>,
    /// Shrunk disagreements, each as a regression test.
    pub regressions: Vec<String>,
    pub coverage: Coverage,
    /// How many cases were also held against `portguard why` ([`why`]).
    pub why_asked: usize,
}

impl Report {
    pub fn cases_per_second(&self) -> f64 {
        self.cases as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    /// A summary for humans.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "difftest: {} cases in {} policy generations, {:.1} s ({:.0} cases/s); {} disagreement(s)\n",
            self.cases,
            self.batches,
            self.elapsed.as_secs_f64(),
            self.cases_per_second(),
            self.disagreements.len()
        );
        s.push_str(&format!(
            "  {} of them also asked of `portguard why` (its offline judgement against the kernel's)\n",
            self.why_asked
        ));
        if let Some(n) = self.first_disagreement_at {
            s.push_str(&format!("  the first one at case {n}\n"));
        }
        let mut kinds: BTreeMap<String, (usize, &Disagreement)> = BTreeMap::new();
        for d in &self.disagreements {
            kinds.entry(d.signature()).or_insert((0, d)).0 += 1;
        }
        for (k, (n, d)) in &kinds {
            s.push_str(&format!(
                "  {n:6} x {k}\n         e.g. from {:?}: {}\n         {}\n",
                NODES[d.op.caller],
                d.op.request(),
                d.problems.join("\n         ")
            ));
        }
        for r in &self.regressions {
            s.push_str(r);
            s.push('\n');
        }
        s
    }
}

/// The executor's answer to one operation.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub errno: i32,
    pub port: u16,
    pub tid: i64,
}

impl Answer {
    /// The call failed with EPERM: what a denial looks like to the caller.
    pub fn eperm(&self) -> bool {
        !self.ok && self.errno == libc::EPERM
    }
}

/// `pgprobe batch` in one cgroup, in a network namespace of its own.
struct Executor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Executor {
    fn start(cgroup: &Path) -> Self {
        let (child, stdin, stdout) = probe_batch(cgroup);
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn run(&mut self, op: &Op) -> Answer {
        writeln!(self.stdin, "{}", op.request()).expect("writing to pgprobe batch");
        self.stdin.flush().expect("flushing pgprobe batch");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading pgprobe batch");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("pgprobe batch answered {line:?} to {}: {e}", op.request()))
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's ephemeral range (initial network namespace), packed as the
/// kernel's `State::ephemeral`.
fn host_range() -> u32 {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("reading ip_local_port_range");
    let mut it = text.split_whitespace().map(|w| w.parse::<u32>().unwrap());
    let (lo, hi) = (it.next().unwrap(), it.next().unwrap());
    (lo << 16) | hi
}

/// The test bed: the cgroup tree, one executor per node and the marker's,
/// the agent, and the position read up to in its event log.
struct Bed {
    root: Cgroup,
    /// Absolute cgroup path of each node of [`NODES`].
    paths: Vec<String>,
    executors: Vec<Option<Executor>>,
    marker: Executor,
    /// Kept for its Drop guard (removed with the root).
    _marker_cg: Cgroup,
    _children: Vec<Cgroup>,
    agent: Agent,
    log_pos: u64,
    marker_seq: u16,
    host_range: u32,
    /// Cases also held against `portguard why`'s judgement ([`why`]).
    why_asked: usize,
}

impl Bed {
    fn new(first: &str) -> Self {
        let root = Cgroup::new("difftest");
        let mut children = Vec::new();
        let mut paths = vec![root.rel.clone()];
        for node in &NODES[1..] {
            let cg = Cgroup::existing(root.fs.join(&node[1..]), &format!("{}{node}", root.rel));
            paths.push(cg.rel.clone());
            children.push(cg);
        }
        let marker_cg = root.child("marker");
        let marker = Executor::start(&marker_cg.fs);
        let text = first.replace("{root}", &root.rel);
        // The event log is read by offset: it must not rotate under the
        // reader (the default rotates at 100 MiB, about 460k cases).
        let agent = Agent::start_with(&text, &["--log-max-size", "0"]);
        Self {
            paths,
            executors: (0..NODES.len()).map(|_| None).collect(),
            marker,
            _marker_cg: marker_cg,
            _children: children,
            root,
            agent,
            log_pos: 0,
            marker_seq: 0,
            host_range: host_range(),
            why_asked: 0,
        }
    }

    fn fs_of(&self, node: usize) -> PathBuf {
        if node == 0 {
            self.root.fs.clone()
        } else {
            self.root.fs.join(&NODES[node][1..])
        }
    }

    /// Reload the agent on `text` (`{root}` stands for the tree's root) and
    /// return the model of it.
    fn load(&mut self, text: &str, first: bool) -> Model {
        let text = text.replace("{root}", &self.root.rel);
        if !first {
            self.agent.reload(&text);
        }
        let file = portguard::policy::parse_policy_str(&text)
            .unwrap_or_else(|e| panic!("the generator wrote an invalid policy: {e:?}\n{text}"));
        Model::new(file, text, self.host_range)
    }

    fn executor(&mut self, node: usize) -> &mut Executor {
        if self.executors[node].is_none() {
            let fs = self.fs_of(node);
            self.executors[node] = Some(Executor::start(&fs));
        }
        self.executors[node].as_mut().expect("just started")
    }

    /// New complete event lines since the last call.
    fn new_events(&mut self) -> Vec<Value> {
        let Ok(mut f) = std::fs::File::open(&self.agent.log) else {
            return Vec::new();
        };
        f.seek(std::io::SeekFrom::Start(self.log_pos))
            .expect("seek");
        let mut text = String::new();
        f.read_to_string(&mut text).expect("reading the event log");
        let Some(end) = text.rfind('\n') else {
            return Vec::new();
        };
        self.log_pos += end as u64 + 1;
        text[..end]
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event {l:?}: {e}")))
            .collect()
    }

    /// Run `ops` under `model`, then the marker; return each operation's
    /// answer and the problems found with it, and problems with no
    /// operation (stray events).
    fn run_batch(
        &mut self,
        model: &Model,
        ops: &[Op],
    ) -> (Vec<(Prediction, Vec<String>)>, Vec<String>) {
        let answers: Vec<Answer> = ops
            .iter()
            .map(|op| self.executor(op.caller).run(op))
            .collect();
        self.marker_seq = self.marker_seq % 60000 + 1;
        let seq = self.marker_seq;
        let marker_op = Op {
            caller: 0,
            kind: OpKind::Bind,
            proto: "tcp",
            addr: IpAddr::from([127, 0, 0, 1]),
            port: seq,
            v6only: false,
        };
        let m = self.marker.run(&marker_op);
        assert!(!m.ok, "the marker bind was not denied: {m:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut events = Vec::new();
        loop {
            let mut got = self.new_events();
            let pos = got.iter().position(|e| {
                e.get("policy").and_then(Value::as_str) == Some(MARKER)
                    && e.get("port").and_then(Value::as_u64) == Some(u64::from(seq))
            });
            if let Some(i) = pos {
                got.truncate(i);
                events.extend(got);
                break;
            }
            events.extend(got);
            assert!(
                Instant::now() < deadline,
                "the marker's event (policy {MARKER}, port {seq}) never came; the marker got \
                 {m:?}; {} other events since the batch began, the last ones:\n{}\n--- policy \
                 ---\n{}\n--- agent stderr (last 40 lines) ---\n{}",
                events.len(),
                events
                    .iter()
                    .rev()
                    .take(5)
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                model.file_text,
                tail(&self.agent.stderr(), 40)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut by_tid: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
        let mut stray = Vec::new();
        for e in events {
            if e.get("verdict").is_none() {
                continue; // loss and suppression reports
            }
            match e.get("tid").and_then(Value::as_i64) {
                Some(t) if answers.iter().any(|a| a.tid == t) => {
                    by_tid.entry(t).or_default().push(e);
                }
                _ => stray.push(format!("stray event (no operation's thread): {e}")),
            }
        }
        let problems = ops
            .iter()
            .zip(&answers)
            .map(|(op, a)| {
                let events = by_tid.remove(&a.tid).unwrap_or_default();
                let chosen = if a.ok {
                    a.port
                } else {
                    compare::own_event(&events)
                        .and_then(|e| e.get("port")?.as_u64())
                        .map_or(0, |p| p as u16)
                };
                let p = predict(model, &self.paths[op.caller], op, chosen);
                let mut problems = compare(&p, a, &events);
                if let Some(why) = why::compare(model, op, &p, a, &events) {
                    self.why_asked += 1;
                    problems.extend(why);
                }
                (p, problems)
            })
            .collect();
        (problems, stray)
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `cfg.cases` generated cases; shrink the first few distinct
/// disagreements.
pub fn run(cfg: &Config) -> Report {
    let start = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut coverage = Coverage::default();
    let mut disagreements = Vec::new();
    let mut file = gen_file(&mut rng);
    let mut bed = Bed::new(&render(&file, "{root}"));
    let mut done = 0;
    let mut batches = 0;
    let mut first = None;
    while done < cfg.cases {
        if batches > 0 {
            file = gen_file(&mut rng);
        }
        let model = bed.load(&render(&file, "{root}"), batches == 0);
        let n = cfg.batch.min(cfg.cases - done);
        let ops: Vec<Op> = (0..n).map(|_| gen_op(&mut rng, &file)).collect();
        let (problems, stray) = bed.run_batch(&model, &ops);
        for (i, (op, (p, probs))) in ops.iter().zip(problems).enumerate() {
            coverage.record(&file, op, &p);
            if !probs.is_empty() {
                first.get_or_insert(done + i + 1);
                disagreements.push(Disagreement {
                    file: file.clone(),
                    op: op.clone(),
                    problems: probs,
                });
            }
        }
        if !stray.is_empty() {
            disagreements.push(Disagreement {
                file: file.clone(),
                op: ops[0].clone(),
                problems: stray,
            });
        }
        done += n;
        batches += 1;
        if cfg.stop_early && first.is_some() {
            break;
        }
    }
    let elapsed = start.elapsed();
    let why_asked = bed.why_asked;
    let mut regressions = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for d in &disagreements {
        if regressions.len() >= cfg.shrink {
            break;
        }
        if !seen.insert(d.signature()) {
            continue;
        }
        let small = shrink::shrink(&mut bed, d.clone());
        regressions.push(shrink::regression_test(&small, regressions.len()));
    }
    if let Some(out) = &cfg.coverage_out {
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(out, coverage.markdown(cfg)).expect("writing the coverage table");
    }
    Report {
        cases: done,
        batches,
        elapsed,
        disagreements,
        first_disagreement_at: first,
        regressions,
        coverage,
        why_asked,
    }
}

/// Parse a request line (as [`Op::request`] writes it) back into an
/// operation run from `caller` (a node of [`NODES`]).
pub fn parse_op(caller: &str, request: &str) -> Op {
    let v: Value = serde_json::from_str(request).expect("an operation as JSON");
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {request}"));
    let kind = match s("op") {
        "bind" => OpKind::Bind,
        "connect" => OpKind::Connect,
        "sendto" => OpKind::Sendto,
        "listen" => OpKind::Listen,
        "raw" => OpKind::Raw,
        other => panic!("unknown operation {other}"),
    };
    let proto = match s("proto") {
        "tcp" => "tcp",
        "udp" => "udp",
        "udplite" => "udplite",
        "mptcp" => "mptcp",
        "raw" => "raw",
        other => panic!("unknown protocol {other}"),
    };
    Op {
        caller: NODES
            .iter()
            .position(|n| *n == caller)
            .unwrap_or_else(|| panic!("{caller} is not a node of the tree")),
        kind,
        proto,
        addr: s("addr").parse().expect("an address"),
        port: v["port"].as_u64().expect("port") as u16,
        v6only: v["v6only"].as_bool().unwrap_or(false),
    }
}

/// A regression test's body: the policy file (`{root}` stands for the
/// tree's root cgroup), the caller's node (`""`, `"/a/b"`, ...) and the
/// operation (an executor request line). Panics with the disagreement if
/// the kernel and the model disagree.
#[track_caller]
pub fn assert_case(policy: &str, caller: &str, request: &str) {
    let op = parse_op(caller, request);
    let mut bed = Bed::new(policy);
    let model = bed.load(policy, true);
    let (mut problems, stray) = bed.run_batch(&model, std::slice::from_ref(&op));
    let mut probs = problems.remove(0).1;
    probs.extend(stray);
    assert!(
        probs.is_empty(),
        "the kernel and the model disagree on {request} from {caller}:\n  {}\npolicy:\n{policy}",
        probs.join("\n  ")
    );
}
