//! `mesh-bench fixture`: what a `mesh::Mesh` test fixture costs (issue 11), beside `mesh
//! up -d --wait` / `mesh down` of the same file and beside the applications started
//! without mesh. See docs/fixture.md, "What it costs".
//!
//! Each round, one after the other: a fixture (`Mesh::from_file(FILE)?.start_blocking()`
//! until it returns ready, then `drop` until it returns, checking that none of its
//! processes is alive), `mesh up -d --wait -f FILE` and `mesh down -f FILE` with
//! `MESH_STATE_DIR` in a fresh directory (the fixture makes its own private one), and the
//! applications alone (`apps.rs`). The rounds are interleaved so that a change of the
//! machine's load during the run touches every phase alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::apps;
use crate::procs::{self, ScratchDir};

// The targets of issue 11 ("mesh as a test fixture").
/// Start to ready: at most this more than the applications' own start.
const TARGET_START_EXTRA: Duration = Duration::from_millis(300);
/// Drop: at most this, plus the `stop_timeout` of applications that ignore their stop
/// signal.
const TARGET_DROP: Duration = Duration::from_millis(100);

/// How long processes may linger after `drop` or `mesh down` returned before they are
/// killed (and the run fails).
const GONE_LIMIT: Duration = Duration::from_secs(5);

/// Measure what a `mesh::Mesh` fixture costs.
#[derive(Debug, clap::Args)]
pub(crate) struct FixtureArgs {
    /// The mesh.toml to start (default: the quickstart, `mesh.toml` in the current
    /// directory, i.e. the repository's root).
    #[arg(short = 'f', long = "file", default_value = "mesh.toml")]
    file: PathBuf,
    /// Measured rounds; each phase's figures are the median, min and max over them.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Rounds run first and not counted (page cache, Python's bytecode cache, …).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Do not start the applications without mesh (their own start time).
    #[arg(long)]
    skip_apps: bool,
}

/// The phases, in the order of the table.
#[derive(Clone, Copy)]
enum Phase {
    FixtureStart,
    FixtureDrop,
    Up,
    Down,
    AppsStart,
    AppsStop,
}

const PHASES: [Phase; 6] = [
    Phase::FixtureStart,
    Phase::FixtureDrop,
    Phase::Up,
    Phase::Down,
    Phase::AppsStart,
    Phase::AppsStop,
];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Self::FixtureStart => "Mesh: from_file + start_blocking → ready",
            Self::FixtureDrop => "Mesh: drop → every process gone",
            Self::Up => "mesh up -d --wait",
            Self::Down => "mesh down",
            Self::AppsStart => "apps alone: spawn → ready",
            Self::AppsStop => "apps alone: stop signal → exited",
        }
    }
}

/// The times of each phase, in rounds.
#[derive(Default)]
struct Samples([Vec<Duration>; 6]);

impl Samples {
    fn push(&mut self, phase: Phase, d: Duration) {
        self.0[phase as usize].push(d);
    }

    fn median(&self, phase: Phase) -> Option<Duration> {
        let mut v = self.0[phase as usize].clone();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        })
    }

    fn min_max(&self, phase: Phase) -> Option<(Duration, Duration)> {
        let v = &self.0[phase as usize];
        Some((*v.iter().min()?, *v.iter().max()?))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the measurement; `Ok(true)` when every round ran and left nothing behind.
pub(crate) fn run(args: &FixtureArgs) -> anyhow::Result<bool> {
    if args.runs == 0 {
        bail!("--runs must be above zero");
    }
    let file = std::fs::canonicalize(&args.file)
        .with_context(|| format!("finding {}", args.file.display()))?;
    let mesh_bin = crate::beside("mesh")?;
    let config = apps::load(&file)?;
    let machine = procs::machine();
    let scratch = ScratchDir::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    let before = other_cpu_pct(Duration::from_secs(1))?;
    let replicas: u32 = config.services.values().map(|s| s.replicas).sum();
    println!("mesh-bench fixture");
    println!(
        "  machine:  {} CPUs, {}, {} RAM, Linux {}",
        machine.cpus, machine.cpu_model, machine.memory, machine.kernel
    );
    println!("  date:     {}", machine.date);
    println!("  mesh:     commit {}", machine.commit);
    println!(
        "  file:     {} (mesh \"{}\", {} services, {replicas} replicas)",
        file.display(),
        config.mesh.name,
        config.services.len()
    );
    println!(
        "  rounds:   {} measured after {} warm-up, each: Mesh start + drop, mesh up -d --wait + mesh down{}",
        args.runs,
        args.warmup,
        if args.skip_apps {
            ""
        } else {
            ", the apps alone"
        }
    );
    println!("  quiet:    {before:.0}% of a CPU busy in the second before the rounds");
    println!();
    crate::flush();

    let mut samples = Samples::default();
    let mut ignored_stop = std::collections::BTreeSet::new();
    let rounds = args.warmup + args.runs;
    let mut after_drop = Vec::new();
    let mut after_down = Vec::new();
    for round in 0..rounds {
        let counted = round >= args.warmup;
        let (start, dropped, lingered) = fixture_once(&file, &rt).context("the Mesh fixture")?;
        after_drop.extend(lingered);
        let state = scratch.path().join(format!("up-{round}"));
        let (up, down, lingered) =
            up_down_once(&mesh_bin, &file, &state).context("mesh up -d --wait / mesh down")?;
        after_down.extend(lingered);
        let alone = if args.skip_apps {
            None
        } else {
            let logs = scratch.path().join(format!("apps-{round}"));
            Some(apps::once(&config, &logs).context("the applications without mesh")?)
        };
        if counted {
            samples.push(Phase::FixtureStart, start);
            samples.push(Phase::FixtureDrop, dropped);
            samples.push(Phase::Up, up);
            samples.push(Phase::Down, down);
            if let Some(a) = alone {
                samples.push(Phase::AppsStart, a.start);
                samples.push(Phase::AppsStop, a.stop);
                ignored_stop.extend(a.ignored_stop);
            }
        }
        eprint!(".");
    }
    eprintln!();
    let after = other_cpu_pct(Duration::from_secs(1))?;

    println!(
        "{:<42} {:>9} {:>9} {:>9}",
        "phase", "median ms", "min ms", "max ms"
    );
    for phase in PHASES {
        let (Some(median), Some((min, max))) = (samples.median(phase), samples.min_max(phase))
        else {
            continue;
        };
        println!(
            "{:<42} {:>9.1} {:>9.1} {:>9.1}",
            phase.label(),
            ms(median),
            ms(min),
            ms(max)
        );
    }
    println!();
    print_targets(&samples, &config, &ignored_stop);
    print_notes(&samples, args, before, after);
    print_lingered("a dropped fixture", &after_drop, rounds);
    print_lingered("`mesh down`", &after_down, rounds);
    drop(scratch);
    // The fixture promises that nothing runs once `drop` returned.
    Ok(after_drop.is_empty())
}

/// Processes found alive when `drop` or `mesh down` had returned.
struct Lingered {
    /// `comm (pid)` of each.
    who: Vec<String>,
    /// How long after the return the last of them was gone; `None`: still alive after
    /// [`GONE_LIMIT`], killed.
    gone_after: Option<Duration>,
}

/// `pids` with their command names, while they run.
fn named(pids: &[i32]) -> Vec<(i32, String)> {
    pids.iter()
        .map(|&p| {
            let comm = procs::stat(p).map_or_else(|_| "?".to_owned(), |s| s.comm);
            (p, comm)
        })
        .collect()
}

/// Which of `pids` still run (just after a `drop` or `mesh down` returned): waits up
/// to [`GONE_LIMIT`] for them, then kills them, so that nothing is left either way.
fn check_gone(pids: &[(i32, String)]) -> Option<Lingered> {
    let alive: Vec<&(i32, String)> = pids.iter().filter(|(p, _)| procs::alive(*p)).collect();
    if alive.is_empty() {
        return None;
    }
    let t = Instant::now();
    let running = || alive.iter().any(|(p, _)| procs::alive(*p));
    while t.elapsed() < GONE_LIMIT && running() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let gone_after = if running() {
        for (p, _) in &alive {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        None
    } else {
        Some(t.elapsed())
    };
    Some(Lingered {
        who: alive.iter().map(|(p, c)| format!("{c} ({p})")).collect(),
        gone_after,
    })
}

fn print_lingered(what: &str, lingered: &[Lingered], rounds: usize) {
    if lingered.is_empty() {
        println!("notes: when {what} returned, none of its processes was alive ({rounds} rounds)");
        return;
    }
    let who: std::collections::BTreeSet<String> = lingered
        .iter()
        .flat_map(|l| {
            l.who
                .iter()
                .map(|w| w.split(" (").next().unwrap_or("?").to_owned())
        })
        .collect();
    let gone: Vec<Duration> = lingered.iter().filter_map(|l| l.gone_after).collect();
    let killed = lingered.len() - gone.len();
    let latest = gone.iter().max().map_or(0.0, |d| ms(*d));
    println!(
        "notes: when {what} returned, processes were still alive in {} of {rounds} rounds ({}): gone at most {latest:.1} ms later{}",
        lingered.len(),
        who.into_iter().collect::<Vec<_>>().join(", "),
        if killed > 0 {
            format!("; in {killed} rounds still alive after {GONE_LIMIT:?} and killed")
        } else {
            String::new()
        }
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

fn print_targets(
    samples: &Samples,
    config: &mesh_supervisor::config::Config,
    ignored_stop: &std::collections::BTreeSet<String>,
) {
    let mut targets = Vec::new();
    if let Some(start) = samples.median(Phase::FixtureStart) {
        match samples.median(Phase::AppsStart) {
            Some(own) => {
                let limit = own + TARGET_START_EXTRA;
                targets.push(format!(
                    "start to ready {:.0} ms ≤ {:.0} ms + the apps' own {:.0} ms = {:.0} ms [{}] (+{:.0} ms over the apps alone)",
                    ms(start),
                    ms(TARGET_START_EXTRA),
                    ms(own),
                    ms(limit),
                    verdict(start <= limit),
                    ms(start.saturating_sub(own)),
                ));
            }
            None => targets.push(format!(
                "start to ready {:.0} ms ≤ {:.0} ms + the apps' own [not measured: --skip-apps]",
                ms(start),
                ms(TARGET_START_EXTRA)
            )),
        }
    }
    if let Some(dropped) = samples.median(Phase::FixtureDrop) {
        // Shutdown stops the services one after the other (reverse start order), so the
        // allowance is the sum of their stop_timeouts.
        let allowance: Duration = ignored_stop
            .iter()
            .filter_map(|s| config.services.get(s))
            .map(|s| s.stop_timeout)
            .sum();
        let which = if ignored_stop.is_empty() {
            "no app ignored its stop signal".to_owned()
        } else {
            format!(
                "the stop_timeout of {}",
                ignored_stop.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        let limit = TARGET_DROP + allowance;
        targets.push(format!(
            "drop {:.0} ms ≤ {:.0} ms + {:.0} ms ({which}) [{}]",
            ms(dropped),
            ms(TARGET_DROP),
            ms(allowance),
            verdict(dropped <= limit)
        ));
    }
    println!("targets: {}", targets.join("; "));
}

fn print_notes(samples: &Samples, args: &FixtureArgs, before: f64, after: f64) {
    if let (Some(fx), Some(up)) = (
        samples.median(Phase::FixtureStart),
        samples.median(Phase::Up),
    ) {
        println!(
            "notes: the fixture is ready {:.0} ms before `mesh up -d --wait` returns: `mesh up -d` starts a second `mesh` process and polls its control socket",
            ms(up.saturating_sub(fx))
        );
    }
    println!(
        "notes: both start a fresh mesh CA in a fresh state directory each round (the fixture a private one, `mesh up -d` MESH_STATE_DIR), and both wait for readiness as SPEC §3 says: first check at spawn, then every 250 ms until it passes (a TCP connect, without [health]: every 100 ms)"
    );
    if !args.skip_apps {
        println!(
            "notes: \"apps alone\" starts the same commands without mesh (same working_dir and environment, each replica's upstream URLs pointing straight at the upstream's replica 0) in depends_on order, and checks readiness the same way (health check, else TCP connect) but every {} ms: it is the time the apps themselves need, the floor of any start; their stop is the stop_signal to every app at once, where mesh stops the services one after the other",
            apps::POLL.as_millis()
        );
    }
    if before >= 10.0 || after >= 10.0 {
        println!(
            "notes: WARNING: the machine was not quiet ({before:.0}% of a CPU busy with other programs in the second before the rounds, {after:.0}% in the second after): the numbers are distorted"
        );
    } else {
        println!(
            "notes: other programs used {before:.0}% of a CPU in the second before the rounds, {after:.0}% in the second after"
        );
    }
    crate::flush();
}

/// One fixture: start until ready, then drop until it returned; checks that none of its
/// processes outlived the drop.
fn fixture_once(
    file: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(Duration, Duration, Option<Lingered>)> {
    let t = Instant::now();
    let mesh = mesh::Mesh::from_file(file)?.start_blocking()?;
    let start = t.elapsed();
    // Its processes: the replicas `ps()` lists, and every process below this one (the
    // shims, and what the apps started).
    let mut pids: Vec<i32> = rt
        .block_on(mesh.ps())
        .iter()
        .filter_map(|r| r.pid)
        .filter_map(|p| i32::try_from(p).ok())
        .collect();
    if pids.is_empty() {
        bail!("ps() shows no running process");
    }
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    pids.extend(procs::descendants(me)?);
    pids.sort_unstable();
    pids.dedup();
    let pids = named(&pids);
    let t = Instant::now();
    drop(mesh);
    let dropped = t.elapsed();
    Ok((start, dropped, check_gone(&pids)))
}

/// `mesh up -d --wait` until it returns, then `mesh down` until it returns, with the
/// state directory `state`; checks that no process of that mesh is left.
fn up_down_once(
    mesh: &Path,
    file: &Path,
    state: &Path,
) -> anyhow::Result<(Duration, Duration, Option<Lingered>)> {
    let run = |args: &[&str]| -> anyhow::Result<Output> {
        Command::new(mesh)
            .args(args)
            .arg("-f")
            .arg(file)
            .env("MESH_STATE_DIR", state)
            .env_remove("MESH_LOG")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running mesh {}", args.join(" ")))
    };
    let t = Instant::now();
    let out = run(&["up", "-d", "--wait"])?;
    let up = t.elapsed();
    if !out.status.success() {
        let _ = run(&["down"]);
        bail!(
            "`mesh up -d --wait` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pid_file = state.join("mesh.pid");
    let mesh_pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", pid_file.display()))?;
    let mut pids = procs::descendants(mesh_pid)?;
    pids.push(mesh_pid);
    let pids = named(&pids);
    let t = Instant::now();
    let out = run(&["down"])?;
    let down = t.elapsed();
    if !out.status.success() {
        bail!(
            "`mesh down` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((up, down, check_gone(&pids)))
}

/// How busy the machine was over `window`, in % of one CPU (this process sleeps
/// meanwhile and runs nothing else).
fn other_cpu_pct(window: Duration) -> anyhow::Result<f64> {
    let ticks = procs::clock_ticks() as f64;
    let (before, _) = procs::machine_cpu_ticks()?;
    std::thread::sleep(window);
    let (after, _) = procs::machine_cpu_ticks()?;
    Ok(after.saturating_sub(before) as f64 / ticks / window.as_secs_f64() * 100.0)
}
