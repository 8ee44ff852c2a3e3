//! Beyond one machine (SPEC §9): hosts joined through a real etcd, each in a network
//! namespace of its own.
//!
//! The test builds a small network: a namespace holding a bridge, and one namespace per
//! host (`a`, `b`, `c`) and for etcd, each joined to the bridge by a veth pair, with
//! addresses in 10.213.0.0/24. Every process of the test runs inside a namespace: the
//! `mesh` hosts and etcd are spawned from a thread that entered it (`setns`), and so is
//! every client request, so that no traffic to the namespaces' private addresses leaves
//! from the root namespace (it could leave the machine). Control commands (`mesh ps`)
//! use the hosts' Unix sockets, which namespaces do not separate.
//!
//! As root (CI) the namespaces are made with `ip netns add` and removed at the end; as
//! another user the test runs itself again under `unshare -Urnm`, where it is root of a
//! private user namespace; it is skipped, saying why, only where neither works (no `ip`,
//! no user namespaces). Needs `ip` (Debian `iproute2`) and `etcd` (`etcd-server`), which
//! `.ci/run` installs.
//!
//! One test walks through every case in order, on one lease TTL of 2 s: a service on
//! host B called from host A (through an outbound, an ingress and a route), `depends_on` a
//! service of other hosts, the local replica preferred while ready and the remote taken
//! while it is not, a caller the remote host's file does not admit (403), host B cut off
//! from the network (A's calls go on without an error; B's lease runs out; back, B
//! registers again under a new lease), host B SIGKILLed (its endpoints leave A's table
//! within the TTL; A's calls fail over with no error), etcd stopped and restarted empty
//! (both hosts keep serving, then register again), a graceful stop (the lease revoked:
//! the keys go at once), and a host with another CA (refused at the TLS handshake, both
//! ways). It ends by proving that no process and no namespace is left.

mod support;

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);
/// The lease TTL of every host: short, so that a host's death is seen quickly.
const TTL: Duration = Duration::from_secs(2);
/// Set in the environment of the copy of the test that runs under `unshare`.
const INSIDE: &str = "MESH_MULTI_HOST_UNSHARED";

// === the lab ===

/// The namespaces of one run, removed (and proven gone) when dropped.
struct Lab {
    /// Prefix of every namespace name of this run.
    tag: String,
    namespaces: Vec<String>,
}

/// One host of the lab: its namespace and address.
#[derive(Clone)]
struct Host {
    ns: String,
    ip: Ipv4Addr,
}

impl Lab {
    /// The lab for `test`, or `None` when this process is not the one to run it: the
    /// test ran again under `unshare` (its outcome is asserted here), or it is skipped.
    fn enter(test: &str) -> Option<Lab> {
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!(
                "SKIPPED {test}: no `ip` command (install iproute2): the multi-host test builds network namespaces with it"
            );
            return None;
        }
        let inside = std::env::var_os(INSIDE).is_some();
        if inside {
            // Root of a private user and mount namespace: a /run of our own holds the
            // namespaces `ip netns` makes.
            run(Command::new("mount").args(["-t", "tmpfs", "tmpfs", "/run"]));
            return Some(Lab::build());
        }
        if nix::unistd::geteuid().is_root() && Lab::can_add_namespaces() {
            return Some(Lab::build());
        }
        // Not root (or root without the right to make namespaces here): run this test
        // again as root of a user namespace.
        let probe = Command::new("unshare")
            .args(["-Urnm", "true"])
            .stderr(Stdio::null())
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!(
                "SKIPPED {test}: cannot make network namespaces: not root, and `unshare -Urnm` does not work here (user namespaces disabled?)"
            );
            return None;
        }
        let exe = std::env::current_exe().expect("the test binary");
        let status = Command::new("unshare")
            .arg("-Urnm")
            .arg("--")
            .arg(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .status()
            .expect("run the test under unshare");
        assert!(
            status.success(),
            "{test} under `unshare -Urnm` failed: {status}"
        );
        None
    }

    fn can_add_namespaces() -> bool {
        let name = format!("mh{}-probe", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            run(Command::new("ip").args(["netns", "del", &name]));
        }
        ok
    }

    /// A bridge in a namespace of its own; hosts are added with [`Lab::host`].
    fn build() -> Lab {
        let tag = format!("mh{}", std::process::id());
        let mut lab = Lab {
            tag,
            namespaces: Vec::new(),
        };
        let br = lab.add_namespace("br");
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        lab
    }

    fn add_namespace(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.tag);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A namespace `name` with address 10.213.0.`n`, on the bridge.
    fn host(&mut self, name: &str, n: u8) -> Host {
        let ns = self.add_namespace(name);
        let br = format!("{}-br", self.tag);
        let veth = format!("v{name}");
        ip(&[
            "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"]);
        let ip_addr = Ipv4Addr::new(10, 213, 0, n);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        Host { ns, ip: ip_addr }
    }

    /// Remove every namespace and check that `ip netns list` shows none of them.
    fn remove(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(
            !list.contains(&self.tag),
            "namespaces of this run are left:\n{list}"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.namespaces.is_empty() {
            self.remove();
        }
    }
}

/// Run `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a thread inside network namespace `ns`: its sockets, and the processes it
/// spawns, are in that namespace.
fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(format!("/run/netns/{ns}")).expect("the namespace");
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("the thread in the namespace")
    })
}

/// `GET addr path`, from inside `ns`.
fn get_in(ns: &str, addr: &str, path: &str) -> std::io::Result<Response> {
    in_ns(ns, || get(addr, path))
}

// === etcd ===

/// A real etcd in its namespace, with a data directory of its own.
struct Etcd {
    host: Host,
    child: Option<Child>,
    dir: tempfile::TempDir,
    generation: u32,
}

impl Etcd {
    fn start(host: Host) -> Etcd {
        let mut etcd = Etcd {
            host,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            generation: 0,
        };
        etcd.launch();
        etcd
    }

    fn url(&self) -> String {
        format!("http://{}:2379", self.host.ip)
    }

    /// Start etcd with a new, empty data directory (a restart loses everything).
    fn launch(&mut self) {
        assert!(self.child.is_none());
        self.generation += 1;
        let data = self.dir.path().join(format!("data-{}", self.generation));
        let log = self
            .dir
            .path()
            .join(format!("etcd-{}.log", self.generation));
        let log = File::create(log).expect("etcd log");
        let client = self.url();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=lab")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=lab=http://127.0.0.1:2380")
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = in_ns(&self.host.ns, || cmd.spawn()).unwrap_or_else(|e| {
            panic!("cannot run etcd ({e}): install the Debian package etcd-server")
        });
        self.child = Some(child);
        let addr = format!("{}:2379", self.host.ip);
        eventually("etcd to answer", T, || {
            get_in(&self.host.ns, &addr, "/health")
                .ok()
                .filter(|r| r.status == 200)
        });
    }

    /// SIGTERM etcd and reap it; its pid.
    fn stop(&mut self) -> i32 {
        let mut child = self.child.take().expect("etcd runs");
        let pid = child.id() as i32;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        child.wait().expect("reap etcd");
        pid
    }

    /// Every key under `prefix` with its value and lease, read from inside etcd's
    /// namespace with the mesh's own etcd client.
    fn keys(&self, prefix: &str) -> Vec<(String, String, i64)> {
        let url = self.url();
        in_ns(&self.host.ns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = mesh_federation::Client::new([url]).expect("client");
                let listing = client
                    .range_prefix(prefix.as_bytes())
                    .await
                    .expect("etcd range");
                listing
                    .kvs
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                            kv.lease,
                        )
                    })
                    .collect()
            })
        })
    }

    /// Whether etcd holds lease `id`.
    fn lease_exists(&self, id: i64) -> bool {
        let url = self.url();
        in_ns(&self.host.ns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = mesh_federation::Client::new([url]).expect("client");
                client
                    .lease_keepalive(mesh_federation::LeaseId(id))
                    .await
                    .expect("etcd keepalive")
                    .is_some()
            })
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// === hosts ===

/// A `mesh up` in a host's namespace, with its project.
struct MeshHost {
    host: Host,
    project: Project,
    mesh: MeshProc,
}

/// `[mesh]` of every host: the shared name and CA, this host's address, etcd.
fn mesh_table(host: &Host, etcd: &Etcd, ca: Option<&PathBuf>) -> String {
    let ca = match ca {
        Some(dir) => format!(
            "ca = {{ cert = \"{}\", key = \"{}\" }}\n",
            dir.join("ca.crt").display(),
            dir.join("ca.key").display()
        ),
        None => String::new(),
    };
    format!(
        "version = 1\n\n[mesh]\nname = \"shop\"\nlisten = \"{}\"\netcd = {{ endpoints = [\"{}\"], lease_ttl = \"{}s\" }}\n{ca}shutdown_timeout = \"10s\"\n",
        host.ip,
        etcd.url(),
        TTL.as_secs()
    )
}

impl MeshHost {
    /// Write `toml` and start `mesh up` inside `host`'s namespace.
    fn start(host: &Host, toml: &str) -> MeshHost {
        let project = Project::new(toml);
        let mesh = in_ns(&host.ns, || project.up(&[]));
        mesh.wait_line("etcd: this host is", T);
        MeshHost {
            host: host.clone(),
            project,
            mesh,
        }
    }

    /// `mesh ps --json`, one object per row.
    fn ps(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.project.run(&["ps", "--json"]);
        assert_eq!(code, 0, "mesh ps failed: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON row"))
            .collect()
    }

    /// `/api/status` of this host's admin server, read from inside its namespace.
    fn api_status(&self) -> Vec<serde_json::Value> {
        let admin = admin(&self.mesh);
        let r = self.get(&admin, "/api/status").expect("GET /api/status");
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str(&r.body).expect("a JSON array")
    }

    /// The hosts `ps` lists endpoints of `service` on (this one as `local`), each with
    /// whether it is marked stale.
    fn endpoints_of(&self, service: &str) -> Vec<(String, bool)> {
        self.ps()
            .iter()
            .filter(|row| row["service"] == service)
            .map(|row| {
                let host = row["host"].as_str().unwrap_or("local").to_string();
                (host, row["stale"].as_bool().unwrap_or(false))
            })
            .collect()
    }

    /// The address after `key=` in the line `service.0 | … key=http://ADDR …`.
    fn url(&self, service: &str, key: &str) -> String {
        let line = self.mesh.wait_line(&format!("{service}.0 | "), T);
        field_of(&line, key)
            .trim_start_matches("http://")
            .to_string()
    }

    /// GET through this host: from inside its namespace.
    fn get(&self, addr: &str, path: &str) -> std::io::Result<Response> {
        get_in(&self.host.ns, addr, path)
    }

    /// GET until the answer's body is `body`; panics with the last answer otherwise.
    fn get_until(&self, addr: &str, body: &str, what: &str) {
        let deadline = Instant::now() + patience(T);
        loop {
            let last = match self.get(addr, "/whoami") {
                Ok(r) if r.status == 200 && r.body == body => return,
                Ok(r) => format!("{} {}", r.status, r.body),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "{what}: no answer from {body} within {T:?}; last: {last}"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// A metric's value in this host's `/metrics` (summed over label sets matching
    /// `selector`, e.g. `mesh_remote_endpoints{service="search"}`).
    fn metric(&self, selector: &str) -> f64 {
        let admin = admin(&self.mesh);
        let text = self.get(&admin, "/metrics").expect("metrics").body;
        let (name, labels) = match selector.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (selector, ""),
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| labels.split(',').all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The pids of the processes `mesh` runs for `service` (its test app as `app`).
    fn app_pids(&self, program: &str, service: &str) -> Vec<i32> {
        pids_of(&self.mesh, program, service, 0)
    }
}

/// A CA shared by the hosts: made by `mesh` itself (a `mesh up` of no service creates
/// its state directory's CA, then finds nothing to run and exits 0).
fn shared_ca() -> (Project, PathBuf) {
    let project = Project::new("version = 1\n[mesh]\nname = \"shop\"\nstate_dir = \"ca\"\n");
    let mut boot = project.up(&[]);
    assert_eq!(boot.exit_code(T), 0, "{}", boot.output().join("\n"));
    let dir = project.file("ca");
    assert!(dir.join("ca.key").is_file(), "no CA made");
    (project, dir)
}

// === the test ===

#[test]
fn hosts_joined_through_etcd() {
    let Some(mut lab) = Lab::enter("hosts_joined_through_etcd") else {
        return;
    };
    let started = Instant::now();
    let app = test_app();
    let a = lab.host("a", 1);
    let b = lab.host("b", 2);
    let c = lab.host("c", 3);
    let mut etcd = Etcd::start(lab.host("etcd", 10));
    let (_ca_project, ca) = shared_ca();

    // Host A: `web` and `intruder` call; `api` runs here and on B; `search` runs on
    // other hosts only, and is exposed here.
    let host_a = MeshHost::start(
        &a,
        &format!(
            r#"{mesh}
[services.web]
command = ["sh", "-c", "echo url=$API_URL search=$SEARCH_URL; exec sleep 600"]
port = "none"
upstreams = ["api", "search"]
depends_on = {{ search = "healthy" }}

[services.intruder]
command = ["sh", "-c", "echo search=$SEARCH_URL; exec sleep 600"]
port = "none"
upstreams = ["search"]

[services.api]
command = ["env", "MESH_SERVICE=api-a", "{app}"]
backoff = {{ initial = "2s", max = "2s" }}
routes = [{{ path_prefix = "/v2", backends = {{ search = 1 }} }}]

# Calls to other hosts may meet a host that answers nothing (cut off): bound each try,
# and retry it on another endpoint.
[services.search]
expose = "127.0.0.1:0"
traffic = {{ retries = {{ attempts = 3, per_try_timeout = "1s", on = ["gateway-error", "reset", "timeout"] }} }}
"#,
            mesh = mesh_table(&a, &etcd, Some(&ca))
        ),
    );
    // B's file says who calls its services: `web` (A's), and the ingresses that expose
    // `search` elsewhere. It does not know `intruder`.
    let host_b_toml = format!(
        r#"{mesh}
[services.web]
upstreams = ["api", "search"]

[services.api]
command = ["env", "MESH_SERVICE=api-b", "{app}"]

[services.search]
command = ["env", "MESH_SERVICE=search-b", "{app}"]
allow = ["ingress"]
"#,
        mesh = mesh_table(&b, &etcd, Some(&ca))
    );

    // `depends_on` a service of other hosts: `web` waits while no host serves `search`.
    eventually("A's api to be ready", T, || {
        host_a
            .ps()
            .iter()
            .any(|r| r["service"] == "api" && r["health"] == "ready")
            .then_some(())
    });
    let web = host_a.ps();
    let web = web.iter().find(|r| r["service"] == "web").expect("web row");
    assert_eq!(
        web["state"], "waiting",
        "web started before search had an endpoint"
    );

    let mut host_b = MeshHost::start(&b, &host_b_toml);
    host_a
        .mesh
        .wait_line("etcd: host `10.213.0.2` serves api, search", T);
    let api_url = host_a.url("web", "url");
    let search_url = host_a.url("web", "search");

    // Registration: each ready endpoint under one lease per host, readable JSON.
    let keys = eventually("B's two endpoints in etcd", T, || {
        let keys = etcd.keys("/mesh/shop/endpoints/");
        (keys.iter().filter(|k| k.0.contains("/10.213.0.2/")).count() == 2).then_some(keys)
    });
    let (key, value, lease) = keys
        .iter()
        .find(|k| k.0 == "/mesh/shop/endpoints/search/10.213.0.2/0")
        .unwrap_or_else(|| panic!("no key for B's search in {keys:#?}"));
    let value: serde_json::Value = serde_json::from_str(value).expect("a JSON value");
    assert_eq!(value["identity"], "spiffe://shop/search", "{key}: {value}");
    assert_eq!(value["protocol"], "http", "{key}: {value}");
    assert!(
        value["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.213.0.2:")),
        "{key}: {value}"
    );
    assert!(*lease != 0, "{key} is not under a lease");
    assert!(
        keys.iter()
            .filter(|k| k.0.contains("/10.213.0.2/"))
            .all(|k| k.2 == *lease),
        "B's keys are not under one lease: {keys:#?}"
    );

    // A service on host B called from host A, through an outbound and an ingress, over
    // mutual TLS to B's inbound, and as the backend of a route.
    let r = host_a.get(&search_url, "/whoami").expect("GET search");
    assert_eq!((r.status, r.body.as_str()), (200, "search-b.0"));
    let r = host_a.get(&api_url, "/v2/whoami").expect("GET api /v2");
    assert_eq!(r.header("x-replica"), Some("search-b.0"), "{r:?}");
    // One CA: both hosts show the same fingerprint in `mesh certs`.
    let ca_line = |host: &MeshHost| {
        let (code, out, err) = host.project.run(&["certs"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.contains("sha256"))
            .map(str::to_string)
            .expect("a fingerprint line")
    };
    assert_eq!(ca_line(&host_a), ca_line(&host_b));
    let ingress_addr = ingress(&host_a.mesh, "search");
    let r = host_a
        .get(&ingress_addr, "/whoami")
        .expect("GET search ingress");
    assert_eq!((r.status, r.body.as_str()), (200, "search-b.0"));
    assert!(
        host_b.metric("mesh_connections_total{listener=\"inbound\",service=\"search\"}") >= 1.0,
        "B's search inbound took no connection: the call did not cross hosts"
    );

    // `mesh ps` lists the remote endpoints beside the local replicas, with their host.
    let rows = host_a.ps();
    assert!(
        rows.iter().any(|r| r["service"] == "search"
            && r["host"] == "10.213.0.2"
            && r["state"] == "remote"
            && r["stale"] == false
            && r["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.213.0.2:"))),
        "{rows:#?}"
    );
    let status = host_a.api_status();
    assert!(
        status
            .iter()
            .any(|r| r["service"] == "search" && r["host"] == "10.213.0.2" && r["stale"] == false),
        "{status:#?}"
    );
    assert!(
        status
            .iter()
            .any(|r| r["service"] == "api" && r["state"] == "running"),
        "{status:#?}"
    );
    let (code, table, _) = host_a.project.run(&["ps"]);
    assert_eq!(code, 0);
    assert!(
        table.lines().next().is_some_and(|h| h.contains("HOST")),
        "{table}"
    );
    assert_eq!(
        host_a.metric("mesh_remote_endpoints{service=\"search\"}"),
        1.0
    );

    // The local replica while it is ready; the remote one while it is not; local again
    // once it is back (its restart waits 1 s).
    for _ in 0..5 {
        let r = host_a.get(&api_url, "/whoami").expect("GET api");
        assert_eq!((r.status, r.body.as_str()), (200, "api-a.0"));
    }
    let local = host_a.app_pids(app, "api-a");
    assert_eq!(local.len(), 1, "A's api process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(local[0]), Signal::SIGKILL)
        .expect("kill A's api");
    // Its key goes at once (it comes back when the replica is ready again, 2 s later).
    eventually("A's api key to be deleted", T, || {
        (!etcd
            .keys("/mesh/shop/endpoints/api/")
            .iter()
            .any(|k| k.0.contains("/10.213.0.1/")))
        .then_some(())
    });
    host_a.get_until(
        &api_url,
        "api-b.0",
        "the remote replica while the local one is down",
    );
    host_a.get_until(&api_url, "api-a.0", "the local replica once it is back");

    // A caller that B's file does not admit: refused by B's inbound.
    let intruder = host_a.url("intruder", "search");
    let r = host_a.get(&intruder, "/whoami").expect("GET as intruder");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("unauthorized"));

    // Host C serves `search` too.
    let host_c = MeshHost::start(
        &c,
        &format!(
            r#"{mesh}
[services.web]
upstreams = ["search"]

[services.search]
command = ["env", "MESH_SERVICE=search-c", "{app}"]
allow = ["ingress"]
"#,
            mesh = mesh_table(&c, &etcd, Some(&ca))
        ),
    );
    eventually("A to know search on B and C", T, || {
        let hosts = host_a.endpoints_of("search");
        (hosts.len() == 2).then_some(())
    });
    host_a.get_until(&search_url, "search-c.0", "C's search");

    // Host B cut off (its link down: packets to it vanish, nothing answers): A's calls
    // keep succeeding (the tries that meet B time out and go to C), B's lease runs out
    // in etcd and its endpoints leave A's table. Back on the network, B finds its lease
    // gone, is granted a new one and registers everything again.
    let traffic = Hammer::start(&a.ns, &search_url);
    traffic.wait_answers(20);
    ip(&["-n", &b.ns, "link", "set", "eth0", "down"]);
    eventually(
        "B's endpoints to leave A's table while B is cut off",
        T,
        || {
            (!host_a
                .endpoints_of("search")
                .iter()
                .any(|(h, _)| h == "10.213.0.2"))
            .then_some(())
        },
    );
    ip(&["-n", &b.ns, "link", "set", "eth0", "up"]);
    let b_keys = eventually("B to register again under a new lease", T, || {
        let keys: Vec<_> = etcd
            .keys("/mesh/shop/endpoints/")
            .into_iter()
            .filter(|k| k.0.contains("/10.213.0.2/"))
            .collect();
        (keys.len() == 2 && keys.iter().all(|k| k.2 != 0 && k.2 != *lease)).then_some(keys)
    });
    assert!(
        b_keys.iter().all(|k| k.2 == b_keys[0].2),
        "B's keys are not under one lease: {b_keys:#?}"
    );
    assert!(
        !etcd.lease_exists(*lease),
        "B's first lease outlived the cut"
    );
    host_b.mesh.wait_line("lease lost", T);
    eventually("A to know B's search again", T, || {
        (host_a.endpoints_of("search").len() == 2).then_some(())
    });
    traffic.wait_answers(traffic.answers() + 20);
    let (answers, failures) = traffic.stop();
    eprintln!(
        "{answers} calls to search while B was cut off, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {answers} calls failed while B was cut off: {failures:?}",
        failures.len()
    );

    // Host B SIGKILLed: A's calls keep succeeding (connect failures and resets of GETs
    // are retried on C), and B's endpoints leave A's table within the lease TTL.
    let traffic = Hammer::start(&a.ns, &search_url);
    traffic.wait_answers(20);
    let b_apps: Vec<i32> = [
        host_b.app_pids(app, "api-b"),
        host_b.app_pids(app, "search-b"),
    ]
    .concat();
    assert_eq!(b_apps.len(), 2, "B's app processes");
    host_b.mesh.signal(Signal::SIGKILL);
    let killed = Instant::now();
    host_b.mesh.wait_exit(T);
    eventually("B's endpoints to leave A's table", T, || {
        (!host_a
            .endpoints_of("search")
            .iter()
            .any(|(h, _)| h == "10.213.0.2"))
        .then_some(())
    });
    let gone_after = killed.elapsed();
    eprintln!("B's endpoints left A's table {gone_after:?} after B was killed (lease TTL {TTL:?})");
    // Expiry comes at most a TTL after the last keep-alive; etcd checks leases every
    // 500 ms and the watch brings the deletion.
    assert!(
        gone_after <= patience(TTL + Duration::from_millis(1500)),
        "B's endpoints stayed {gone_after:?} after B was killed"
    );
    traffic.wait_answers(traffic.answers() + 20);
    let (answers, failures) = traffic.stop();
    eprintln!(
        "{answers} calls to search while B died, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {answers} calls failed while B died: {failures:?}",
        failures.len()
    );
    assert_gone(&b_apps, T);

    // etcd stopped: the hosts keep serving from the last known table, marked stale.
    let etcd_pid = etcd.stop();
    assert_gone(&[etcd_pid], T);
    eventually("A's table to be marked stale", T, || {
        host_a
            .endpoints_of("search")
            .iter()
            .any(|(h, stale)| h == "10.213.0.3" && *stale)
            .then_some(())
    });
    assert_eq!(host_a.metric("mesh_remote_endpoints_stale"), 1.0);
    assert!(
        host_a
            .api_status()
            .iter()
            .any(|r| r["host"] == "10.213.0.3" && r["stale"] == true),
        "/api/status does not mark the endpoints stale"
    );
    host_a.mesh.wait_line("etcd: cannot be read", T);
    let (_, table, _) = host_a.project.run(&["ps"]);
    assert!(table.contains("stale"), "{table}");
    for _ in 0..5 {
        let r = host_a.get(&search_url, "/whoami").expect("GET search");
        assert_eq!((r.status, r.body.as_str()), (200, "search-c.0"));
        let r = host_a.get(&api_url, "/whoami").expect("GET api");
        assert_eq!((r.status, r.body.as_str()), (200, "api-a.0"));
    }

    // etcd back, empty (its data lost): both hosts register again under new leases,
    // and read each other's endpoints afresh.
    etcd.launch();
    eventually("A and C to register again", T, || {
        let keys = etcd.keys("/mesh/shop/endpoints/");
        let a_keys = keys
            .iter()
            .any(|k| k.0 == "/mesh/shop/endpoints/api/10.213.0.1/0");
        let c_keys = keys
            .iter()
            .any(|k| k.0 == "/mesh/shop/endpoints/search/10.213.0.3/0");
        (a_keys && c_keys).then_some(())
    });
    eventually("A's table to be fresh again", T, || {
        (host_a.endpoints_of("search") == [("10.213.0.3".to_string(), false)]).then_some(())
    });
    eventually("C to know A's api again", T, || {
        (host_c.endpoints_of("api") == [("10.213.0.1".to_string(), false)]).then_some(())
    });
    assert_eq!(host_a.metric("mesh_remote_endpoints_stale"), 0.0);
    let r = host_a.get(&search_url, "/whoami").expect("GET search");
    assert_eq!((r.status, r.body.as_str()), (200, "search-c.0"));

    // A graceful stop revokes the host's lease: its keys go at once, not at expiry.
    let c_lease = etcd
        .keys("/mesh/shop/endpoints/search/10.213.0.3/")
        .first()
        .map(|k| k.2)
        .expect("C's key");
    let c_apps = host_c.app_pids(app, "search-c");
    // The project (its state directory) lives on until the end of the test.
    let MeshHost {
        mesh: mut c_mesh,
        project: _c_project,
        ..
    } = host_c;
    c_mesh.signal(Signal::SIGTERM);
    c_mesh.wait_line("etcd: left", T);
    assert!(
        !etcd.lease_exists(c_lease),
        "C's lease outlived its graceful stop"
    );
    assert!(
        etcd.keys("/mesh/shop/endpoints/")
            .iter()
            .all(|k| !k.0.contains("/10.213.0.3/")),
        "C's keys outlived its graceful stop"
    );
    assert_eq!(c_mesh.exit_code(T), 0);
    assert_gone(&c_apps, T);

    // A host with another CA (its own, in its state_dir) joins etcd: every call between
    // it and the others is refused at the TLS handshake, both ways.
    let rogue = MeshHost::start(
        &c,
        &format!(
            r#"{mesh}
[services.web]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 600"]
port = "none"
upstreams = ["api"]

[services.api]

[services.search]
command = ["env", "MESH_SERVICE=search-rogue", "{app}"]
"#,
            mesh = mesh_table(&c, &etcd, None)
        ),
    );
    eventually("A to know the rogue host's search", T, || {
        (host_a.endpoints_of("search") == [("10.213.0.3".to_string(), false)]).then_some(())
    });
    let r = host_a.get(&search_url, "/whoami").expect("GET search");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("connect-failed"), "{r:?}");
    assert!(r.body.contains("tls handshake"), "{}", r.body);
    assert!(
        host_a.metric("mesh_tls_handshake_failures_total{service=\"search\",side=\"client\"}")
            >= 1.0
    );
    let rogue_api = rogue.url("web", "url");
    eventually("the rogue host to know A's api", T, || {
        (rogue.endpoints_of("api") == [("10.213.0.1".to_string(), false)]).then_some(())
    });
    let r = rogue
        .get(&rogue_api, "/whoami")
        .expect("GET api from the rogue host");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("connect-failed"), "{r:?}");
    assert!(
        host_a.metric("mesh_tls_handshake_failures_total{service=\"api\",side=\"server\"}") >= 1.0
    );

    // The end: everything stops, and nothing is left.
    let mut pids = vec![host_a.mesh.pid(), rogue.mesh.pid()];
    pids.extend(host_a.app_pids(app, "api-a"));
    pids.extend(host_a.app_pids("sleep", "web"));
    pids.extend(host_a.app_pids("sleep", "intruder"));
    pids.extend(rogue.app_pids(app, "search-rogue"));
    pids.extend(rogue.app_pids("sleep", "web"));
    assert_eq!(pids.len(), 7, "processes of A and the rogue host: {pids:?}");
    for mut host in [host_a, rogue] {
        host.mesh.signal(Signal::SIGTERM);
        assert_eq!(host.mesh.exit_code(T), 0);
    }
    let etcd_pid = etcd.stop();
    pids.push(etcd_pid);
    assert_gone(&pids, T);
    drop(etcd);
    lab.remove();
    let took = started.elapsed();
    eprintln!("multi-host walkthrough took {took:?}");
}

// === steady traffic from inside a namespace ===

/// GETs one after the other from inside a namespace, until stopped: each answer other
/// than a 200 is kept.
struct Hammer {
    stop: Arc<AtomicBool>,
    answers: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Hammer {
    fn start(ns: &str, addr: &str) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ns, addr) = (ns.to_string(), addr.to_string());
        let thread = {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                let file = File::open(format!("/run/netns/{ns}")).expect("the namespace");
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match get(&addr, "/whoami") {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                        Err(e) => failures.push(e.to_string()),
                    }
                    answers.fetch_add(1, Ordering::SeqCst);
                }
                failures
            })
        };
        Hammer {
            stop,
            answers,
            thread,
        }
    }

    fn answers(&self) -> usize {
        self.answers.load(Ordering::SeqCst)
    }

    fn wait_answers(&self, n: usize) {
        eventually(&format!("{n} answers"), T, || {
            (self.answers() >= n).then_some(())
        });
    }

    /// Stop; how many calls were made, and the failures.
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.thread.join().expect("traffic thread");
        (self.answers.load(Ordering::SeqCst), failures)
    }
}

// === without namespaces ===

/// `mesh check` shows `listen`, `etcd` and the services of other hosts.
#[test]
fn check_shows_the_hosts_settings() {
    let project = Project::new(
        r#"
version = 1
[mesh]
name = "shop"
listen = "10.0.0.5"
etcd = { endpoints = ["http://10.0.0.9:2379"], lease_ttl = "3s" }

[services.web]
command = ["sh", "-c", "exec sleep 600"]
upstreams = ["search"]
depends_on = { search = "healthy" }

[services.search]
expose = 8080
"#,
    );
    let (code, out, err) = project.check();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "listen            10.0.0.5 (inbounds bind here; advertised to other hosts)",
        "etcd              http://10.0.0.9:2379 (host `10.0.0.5`, keys under /mesh/shop/endpoints/, lease 3s)",
        "search  on other hosts (nothing started here; endpoints from etcd)",
        "depends_on: search (healthy: a ready endpoint on another host)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(project.file("mesh.toml"))
        .expect("mesh.toml");
    writeln!(file, "replicas = 2").expect("write");
    let (code, _, err) = project.check();
    assert_eq!(code, 78);
    assert!(
        err.contains("`replicas` describes a process, but service `search` has no `command`"),
        "{err}"
    );
}
