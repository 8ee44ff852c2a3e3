//! File watching (SPEC §4 "Watch" and "Reload"): a service's files restart it, a change
//! of mesh.toml reloads it.
//!
//! **Services.** Each distinct `working_dir` of the running services that have `watch`
//! patterns is a [`Tree`], watched by a thread of its own: one non-recursive inotify
//! watch per directory that is not ignored, added as directories appear. Ignored are
//! `.git/`, `target/`, `node_modules/`, the mesh's state dir and what the `.gitignore`
//! files of the tree and of its parents up to the repository root ignore; an ignored
//! directory gets no watch at all, so a large `node_modules` costs nothing. The thread
//! sends every change of a path that is not ignored, relative to `working_dir`; the task
//! matches it against each service's patterns ([`WatchPatterns`], globset), waits for
//! 300 ms without a change (3 s at most, so that a file written without a pause still
//! restarts), then asks the runtime for a rolling restart (`mesh restart`: no backoff,
//! `failed` cleared). Changes made while that restart runs lead to one more restart once
//! it is done.
//!
//! **mesh.toml.** Its directory is watched and events are filtered on the file's name,
//! since editors replace a file by renaming another over it; after the same debounce, a
//! reload. Not when `NOTIFY_SOCKET` is set: under systemd a reload comes by SIGHUP.
//! After any reload the list of watched services is read again from the configuration
//! in force (the task looks whenever a replica's status changes, and after its own
//! reloads).
//!
//! The walks and the `.gitignore` reading run on the tree threads, never on the runtime,
//! which also carries every sidecar.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use ::notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use ::notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use ignore::Match;
use ignore::gitignore::Gitignore;
use mesh_supervisor::config::{Config, WatchPatterns};
use mesh_supervisor::lifecycle::State;
use mesh_supervisor::supervisor::Statuses;
use tokio::sync::mpsc;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::runtime::Runtime;

/// How long a watched tree must be quiet before a change acts (SPEC §4).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// The longest a change waits for quiet: files written without a pause still act.
const MAX_WAIT: Duration = Duration::from_secs(3);

/// Directory names never watched, wherever they are below a `working_dir`.
const NEVER: &[&str] = &[".git", "target", "node_modules"];

/// How many changed paths the restart line names.
const NAMED: usize = 3;

/// Watch the running services' files and (unless `notify_socket`) mesh.toml, until the
/// task is aborted. `state_dir` is the mesh's, never watched.
pub(crate) async fn run(runtime: Runtime, notify_socket: bool, state_dir: PathBuf) {
    let (tx, mut signals) = mpsc::unbounded_channel();
    let config = runtime.config();
    // Kept for the life of the task: dropping it stops watching the file.
    let _config_watcher = if notify_socket {
        None
    } else {
        match watch_config(&config.path, tx.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                runtime.logs().mesh_line(&format!(
                    "cannot watch {} for changes ({e}): use `mesh reload`",
                    config.path.display()
                ));
                None
            }
        }
    };
    let mut watch = Watch {
        runtime: runtime.clone(),
        state_dir,
        signals: tx,
        config,
        trees: BTreeMap::new(),
        slots: BTreeMap::new(),
        jobs: JoinSet::new(),
        job_keys: HashMap::new(),
        running: None,
    };
    let mut status = runtime.status();
    let statuses = status.borrow_and_update().clone();
    watch.refresh(&statuses);
    loop {
        let deadline = watch.next_deadline();
        tokio::select! {
            signal = signals.recv() => {
                if let Some(signal) = signal {
                    watch.on_signal(signal);
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => watch.fire(),
            Some(done) = watch.jobs.join_next_with_id() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "a watch restart or reload task failed");
                        e.id()
                    }
                };
                watch.done(id);
            }
            changed = status.changed() => {
                if changed.is_err() {
                    // The supervisor is gone: the mesh is stopping.
                    return;
                }
                let statuses = status.borrow_and_update().clone();
                watch.refresh(&statuses);
            }
        }
    }
}

/// What the watchers tell the task.
#[derive(Debug)]
enum Signal {
    /// The tree of this `working_dir` is watched, in `dirs` directories.
    Watching { tree: PathBuf, dirs: usize },
    /// A path below the tree of this `working_dir` changed (relative to it).
    Changed { tree: PathBuf, path: PathBuf },
    /// The kernel dropped events of this tree: anything may have changed.
    Lost { tree: PathBuf },
    /// Something the operator should know (a watch limit reached).
    Warn(String),
    /// mesh.toml changed.
    ConfigFile,
}

/// What a debounced change acts on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Service(String),
    ConfigFile,
}

/// The task's state.
struct Watch {
    runtime: Runtime,
    state_dir: PathBuf,
    /// Handed to each tree thread.
    signals: mpsc::UnboundedSender<Signal>,
    /// The configuration the trees were made from.
    config: Arc<Config>,
    /// By `working_dir`.
    trees: BTreeMap<PathBuf, TreeEntry>,
    slots: BTreeMap<Key, Slot>,
    /// Restarts and reloads under way.
    jobs: JoinSet<()>,
    job_keys: HashMap<Id, Key>,
    /// The services running when the trees were last made (with `config`): a refresh
    /// with neither changed has nothing to do.
    running: Option<BTreeSet<String>>,
}

/// A watched `working_dir` and the services that watch it.
struct TreeEntry {
    /// Stops the thread when dropped.
    _thread: TreeHandle,
    services: Vec<(String, WatchPatterns)>,
}

/// The changes waiting to act on one [`Key`], and whether it is acting.
#[derive(Default)]
struct Slot {
    pending: Option<Pending>,
    /// A restart or reload of this key runs.
    busy: bool,
}

/// Changes not acted on yet.
struct Pending {
    first: Instant,
    last: Instant,
    /// Changed paths, relative to `working_dir`, to name in the log.
    paths: BTreeSet<String>,
    /// Quiet long enough, waiting only for the running restart to end.
    due: bool,
}

// === impl Watch ===

impl Watch {
    /// Make the trees match the running services with `watch` patterns, as the
    /// configuration in force says.
    fn refresh(&mut self, statuses: &Statuses) {
        let config = self.runtime.config();
        let running: BTreeSet<String> = statuses.values().map(|r| r.service.clone()).collect();
        if Arc::ptr_eq(&config, &self.config) && self.running.as_ref() == Some(&running) {
            return;
        }
        self.config = config;
        let mut wanted: BTreeMap<PathBuf, Vec<(String, WatchPatterns)>> = BTreeMap::new();
        for (name, svc) in &self.config.services {
            if svc.watch.is_empty() || !running.contains(name) {
                continue;
            }
            // Validation compiled these already; a failure here cannot happen.
            let Ok(patterns) = WatchPatterns::new(&svc.watch) else {
                continue;
            };
            wanted
                .entry(svc.working_dir.clone())
                .or_default()
                .push((name.clone(), patterns));
        }
        self.trees.retain(|dir, _| wanted.contains_key(dir));
        for (dir, services) in wanted {
            match self.trees.get_mut(&dir) {
                Some(entry) => entry.services = services,
                None => {
                    let thread = TreeHandle::spawn(
                        dir.clone(),
                        self.state_dir.clone(),
                        self.signals.clone(),
                    );
                    self.trees.insert(
                        dir,
                        TreeEntry {
                            _thread: thread,
                            services,
                        },
                    );
                }
            }
        }
        // Changes waiting for services no longer watched are dropped.
        let watched: BTreeSet<&str> = self
            .trees
            .values()
            .flat_map(|t| t.services.iter().map(|(s, _)| s.as_str()))
            .collect();
        self.slots.retain(|key, slot| match key {
            Key::Service(s) => slot.busy || watched.contains(s.as_str()),
            Key::ConfigFile => true,
        });
        self.running = Some(running);
    }

    fn on_signal(&mut self, signal: Signal) {
        if matches!(signal, Signal::Changed { .. } | Signal::Lost { .. })
            && !Arc::ptr_eq(&self.runtime.config(), &self.config)
        {
            // A reload (SIGHUP, `mesh reload`) changed no status but maybe patterns.
            let statuses = self.runtime.status().borrow().clone();
            self.refresh(&statuses);
        }
        match signal {
            Signal::Changed { tree, path } => {
                let Some(entry) = self.trees.get(&tree) else {
                    return;
                };
                let shown = path.to_string_lossy().into_owned();
                let hits: Vec<String> = entry
                    .services
                    .iter()
                    .filter(|(_, patterns)| patterns.matches(&path))
                    .map(|(s, _)| s.clone())
                    .collect();
                for service in hits {
                    self.changed(Key::Service(service), Some(shown.clone()));
                }
            }
            Signal::Lost { tree } => {
                let services: Vec<String> = self
                    .trees
                    .get(&tree)
                    .map(|e| e.services.iter().map(|(s, _)| s.clone()).collect())
                    .unwrap_or_default();
                for service in services {
                    self.changed(
                        Key::Service(service),
                        Some("files unknown: the kernel dropped events".into()),
                    );
                }
            }
            Signal::Watching { tree, dirs } => {
                let Some(entry) = self.trees.get(&tree) else {
                    return;
                };
                for (service, _) in &entry.services {
                    let patterns = self
                        .config
                        .services
                        .get(service)
                        .map(|s| s.watch.join(", "))
                        .unwrap_or_default();
                    let unit = if dirs == 1 {
                        "directory"
                    } else {
                        "directories"
                    };
                    self.runtime.logs().mesh_line(&format!(
                        "{service}: watching {patterns} in {} ({dirs} {unit})",
                        tree.display()
                    ));
                }
            }
            Signal::Warn(line) => self.runtime.logs().mesh_line(&line),
            Signal::ConfigFile => self.changed(Key::ConfigFile, None),
        }
    }

    /// Note a change for `key`: its quiet period starts again.
    fn changed(&mut self, key: Key, path: Option<String>) {
        let now = Instant::now();
        let slot = self.slots.entry(key).or_default();
        let pending = slot.pending.get_or_insert_with(|| Pending {
            first: now,
            last: now,
            paths: BTreeSet::new(),
            due: false,
        });
        pending.last = now;
        pending.due = false;
        pending.paths.extend(path);
    }

    /// When the next quiet period ends.
    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| s.pending.as_ref())
            .filter(|p| !p.due)
            .map(Pending::deadline)
            .min()
    }

    /// Act on the keys whose quiet period has ended; those whose restart still runs
    /// act once it ends.
    fn fire(&mut self) {
        let now = Instant::now();
        let mut ready = Vec::new();
        for (key, slot) in &mut self.slots {
            let Some(pending) = &mut slot.pending else {
                continue;
            };
            if pending.due || pending.deadline() > now {
                continue;
            }
            if slot.busy {
                pending.due = true;
            } else {
                ready.push(key.clone());
            }
        }
        for key in ready {
            self.start(key);
        }
    }

    /// A restart or reload ended: start the next one if changes came meanwhile.
    fn done(&mut self, id: Id) {
        let Some(key) = self.job_keys.remove(&id) else {
            return;
        };
        if key == Key::ConfigFile {
            // The watch list follows the configuration in force.
            let statuses = self.runtime.status().borrow().clone();
            self.refresh(&statuses);
        }
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        slot.busy = false;
        if slot.pending.as_ref().is_some_and(|p| p.due) {
            self.start(key);
        }
    }

    /// Restart the service, or reload, for the changes pending on `key`.
    fn start(&mut self, key: Key) {
        let Some(pending) = self.slots.get_mut(&key).and_then(|s| s.pending.take()) else {
            return;
        };
        let runtime = self.runtime.clone();
        let handle = match &key {
            Key::ConfigFile => {
                let name = self
                    .config
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                runtime
                    .logs()
                    .mesh_line(&format!("{name} changed: reloading"));
                // The reload logs what it does and why it refuses.
                self.jobs.spawn(
                    async move {
                        runtime.reload().await;
                    }
                    .instrument(tracing::info_span!("watch_reload")),
                )
            }
            Key::Service(service) => {
                if !self.restartable(service) {
                    return;
                }
                runtime.logs().mesh_line(&format!(
                    "{service}: files changed ({}): restarting",
                    name_paths(&pending.paths)
                ));
                let span = tracing::info_span!("watch_restart", service = %service);
                let service = service.clone();
                // A replacement that fails is logged by the supervisor, with why.
                self.jobs.spawn(
                    async move {
                        let _ = runtime.service_command("restart", &service).await;
                    }
                    .instrument(span),
                )
            }
        };
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.busy = true;
        }
        self.job_keys.insert(handle.id(), key);
    }

    /// Whether a change may restart `service`: it is still watched and not stopped
    /// (`mesh stop`, or the mesh stopping).
    fn restartable(&self, service: &str) -> bool {
        let watched = self
            .trees
            .values()
            .any(|t| t.services.iter().any(|(s, _)| s == service));
        watched
            && self.runtime.status().borrow().values().any(|r| {
                r.service == service && !matches!(r.state, State::Stopped | State::Stopping)
            })
    }
}

// === impl Pending ===

impl Pending {
    fn deadline(&self) -> Instant {
        (self.last + DEBOUNCE).min(self.first + MAX_WAIT)
    }
}

/// `app.py`, `a.py, b.py, c.py and 2 more`.
fn name_paths(paths: &BTreeSet<String>) -> String {
    let mut named: Vec<&str> = paths.iter().take(NAMED).map(String::as_str).collect();
    let more = paths.len().saturating_sub(NAMED);
    let last = if more > 0 {
        format!("{more} more")
    } else {
        named.pop().unwrap_or_default().to_string()
    };
    if named.is_empty() {
        last
    } else {
        format!("{} and {last}", named.join(", "))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Watch the directory of mesh.toml (`path`) and signal changes of the file.
fn watch_config(
    path: &Path,
    out: mpsc::UnboundedSender<Signal>,
) -> ::notify::Result<RecommendedWatcher> {
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = ::notify::recommended_watcher(move |event: ::notify::Result<Event>| {
        let Ok(event) = event else {
            return;
        };
        let paths: &[PathBuf] = match event.kind {
            // The file moved away: what replaces it comes as its own event.
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                return;
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                event.paths.get(1..).unwrap_or_default()
            }
            EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write)) => &event.paths,
            _ => return,
        };
        if paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = out.send(Signal::ConfigFile);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

// === Tree ===

/// The task's end of a tree thread: dropping it stops the thread.
struct TreeHandle {
    tx: std_mpsc::Sender<TreeMsg>,
}

enum TreeMsg {
    Event(::notify::Result<Event>),
    Stop,
}

/// One watched `working_dir`, owned by its thread.
struct Tree {
    /// The `working_dir` as configured: what the task knows the tree by.
    key: PathBuf,
    /// `key` with symlinks resolved, as the watches and their events name it.
    root: PathBuf,
    state_dir: PathBuf,
    /// `.gitignore` matchers by the directory holding the file.
    ignores: BTreeMap<PathBuf, Gitignore>,
    watcher: RecommendedWatcher,
    out: mpsc::UnboundedSender<Signal>,
    /// The watch limit was reached and said.
    limit_said: bool,
}

// === impl TreeHandle ===

impl TreeHandle {
    fn spawn(key: PathBuf, state_dir: PathBuf, out: mpsc::UnboundedSender<Signal>) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let events = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("mesh-watch".into())
            .spawn({
                let out = out.clone();
                let key = key.clone();
                move || Tree::run(key, state_dir, rx, events, out)
            });
        if let Err(e) = spawned {
            let _ = out.send(Signal::Warn(format!("cannot watch {}: {e}", key.display())));
        }
        TreeHandle { tx }
    }
}

impl Drop for TreeHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(TreeMsg::Stop);
    }
}

// === impl Tree ===

impl Tree {
    /// The thread: watch every directory that is not ignored, then pass events on until
    /// told to stop.
    fn run(
        key: PathBuf,
        state_dir: PathBuf,
        rx: std_mpsc::Receiver<TreeMsg>,
        events: std_mpsc::Sender<TreeMsg>,
        out: mpsc::UnboundedSender<Signal>,
    ) {
        let warn = |what: String| {
            let _ = out.send(Signal::Warn(format!(
                "cannot watch {}: {what}",
                key.display()
            )));
        };
        let root = match key.canonicalize() {
            Ok(root) => root,
            Err(e) => return warn(e.to_string()),
        };
        let watcher = ::notify::recommended_watcher(move |event| {
            let _ = events.send(TreeMsg::Event(event));
        });
        let watcher = match watcher {
            Ok(watcher) => watcher,
            Err(e) => return warn(e.to_string()),
        };
        let mut tree = Tree {
            key: key.clone(),
            state_dir: state_dir.canonicalize().unwrap_or(state_dir),
            root: root.clone(),
            ignores: BTreeMap::new(),
            watcher,
            out: out.clone(),
            limit_said: false,
        };
        tree.load_parent_ignores();
        let dirs = tree.add_dir(&root, false);
        let _ = out.send(Signal::Watching { tree: key, dirs });
        while let Ok(msg) = rx.recv() {
            match msg {
                TreeMsg::Event(Ok(event)) => tree.on_event(&event),
                TreeMsg::Event(Err(e)) => tree.on_error(&e),
                TreeMsg::Stop => break,
            }
        }
    }

    fn on_event(&mut self, event: &Event) {
        if event.need_rescan() {
            let _ = self.out.send(Signal::Lost {
                tree: self.key.clone(),
            });
            return;
        }
        // Opening and reading a file is no change (an app reads its sources).
        let change = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        if !change {
            return;
        }
        for path in &event.paths {
            let Ok(relative) = path.strip_prefix(&self.root) else {
                continue;
            };
            if relative.as_os_str().is_empty() {
                continue;
            }
            let is_dir = match event.kind {
                EventKind::Create(::notify::event::CreateKind::Folder)
                | EventKind::Remove(::notify::event::RemoveKind::Folder) => true,
                EventKind::Remove(_) => false,
                _ => std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()),
            };
            if path.file_name().is_some_and(|n| n == ".gitignore") {
                if let Some(dir) = path.parent() {
                    // What it ignores now may differ: read it again, and watch the
                    // directories it no longer ignores.
                    self.load_ignore(dir);
                    if !self.ignored(dir, true) {
                        let dir = dir.to_path_buf();
                        let _ = self.add_dir(&dir, false);
                    }
                }
            }
            if self.ignored(path, is_dir) {
                continue;
            }
            let appeared = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To))
            );
            if is_dir && appeared {
                // Files may have been written in it before its watch was added: they
                // count as changed.
                let _ = self.add_dir(path, true);
            }
            self.send(relative.to_path_buf());
        }
    }

    fn on_error(&mut self, error: &::notify::Error) {
        if let ::notify::ErrorKind::MaxFilesWatch = error.kind {
            self.say_limit();
        } else {
            tracing::debug!(tree = %self.root.display(), %error, "watch error");
        }
    }

    /// Watch `dir` and every directory below it that is not ignored (`dir` is not); with
    /// `report`, every file found counts as changed. Returns how many directories are
    /// watched.
    fn add_dir(&mut self, dir: &Path, report: bool) -> usize {
        let mut stack = vec![dir.to_path_buf()];
        let mut watched = 0;
        while let Some(dir) = stack.pop() {
            self.load_ignore(&dir);
            if let Err(e) = self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                if let ::notify::ErrorKind::MaxFilesWatch = e.kind {
                    self.say_limit();
                    break;
                }
                // Gone already: its removal is an event of its parent.
                continue;
            }
            watched += 1;
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                // Symbolic links are not followed: no loops, no trees outside.
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if self.ignored_here(&path, is_dir) {
                    continue;
                }
                if is_dir {
                    stack.push(path);
                } else if report {
                    if let Ok(relative) = path.strip_prefix(&self.root) {
                        self.send(relative.to_path_buf());
                    }
                }
            }
        }
        watched
    }

    /// Whether `path` (below the root) is ignored, itself or by one of its directories.
    fn ignored(&self, path: &Path, is_dir: bool) -> bool {
        let Ok(relative) = path.strip_prefix(&self.root) else {
            return true;
        };
        let mut at = self.root.clone();
        let mut components = relative.components().peekable();
        while let Some(component) = components.next() {
            at.push(component);
            let last = components.peek().is_none();
            if self.ignored_here(&at, !last || is_dir) {
                return true;
            }
        }
        false
    }

    /// Whether `path` is ignored in itself, its directories aside.
    fn ignored_here(&self, path: &Path, is_dir: bool) -> bool {
        if path
            .file_name()
            .is_some_and(|n| NEVER.iter().any(|never| n == *never))
        {
            return true;
        }
        if path.starts_with(&self.state_dir) {
            return true;
        }
        // The deepest `.gitignore` that says something about the path decides, as in
        // git.
        for dir in path.ancestors().skip(1) {
            if let Some(gitignore) = self.ignores.get(dir) {
                match gitignore.matched(path, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        false
    }

    /// Read `dir/.gitignore`, or forget it when there is none.
    fn load_ignore(&mut self, dir: &Path) {
        let file = dir.join(".gitignore");
        if file.is_file() {
            // Lines that are not valid globs are skipped, as git skips them.
            let (gitignore, _) = Gitignore::new(&file);
            self.ignores.insert(dir.to_path_buf(), gitignore);
        } else {
            self.ignores.remove(dir);
        }
    }

    /// Read the `.gitignore` files of the root's parents up to the root of the git
    /// repository holding it; none when it is in no repository.
    fn load_parent_ignores(&mut self) {
        if self.root.join(".git").exists() {
            return;
        }
        let parents: Vec<PathBuf> = self
            .root
            .ancestors()
            .skip(1)
            .map(Path::to_path_buf)
            .collect();
        let Some(top) = parents.iter().position(|p| p.join(".git").exists()) else {
            return;
        };
        for dir in &parents[..=top] {
            self.load_ignore(dir);
        }
    }

    fn send(&self, path: PathBuf) {
        let _ = self.out.send(Signal::Changed {
            tree: self.key.clone(),
            path,
        });
    }

    fn say_limit(&mut self) {
        if !self.limit_said {
            self.limit_said = true;
            let _ = self.out.send(Signal::Warn(format!(
                "cannot watch every directory of {}: the inotify watch limit is reached \
                 (sysctl fs.inotify.max_user_watches); changes in some directories are missed",
                self.key.display()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_line_names_a_few_paths() {
        let paths = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(name_paths(&paths(&["app.py"])), "app.py");
        assert_eq!(name_paths(&paths(&["a.py", "b.py"])), "a.py and b.py");
        assert_eq!(
            name_paths(&paths(&["a", "b", "c", "d", "e"])),
            "a, b, c and 2 more"
        );
    }
}
