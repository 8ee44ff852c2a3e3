//! The dashboard in a real browser (SPEC §5): headless Chromium, driven through
//! chromedriver (WebDriver, by the `fantoccini` crate over plain HTTP), looks at the page
//! of a real `mesh up` with traffic between three services, and a screenshot is written
//! to `target/dashboard.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Every page
//! assertion polls with a deadline (`support::eventually`), never a sleep.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::traffic::request;
use support::*;

const T: Duration = Duration::from_secs(30);

/// The browser test: observed edges with their rates, a refused call marked, a SIGKILL
/// shown as a restart within 2 s, a request's trace id in the live calls, a service's
/// details, the stale indicator once the mesh is gone; and a screenshot.
#[test]
fn the_dashboard_shows_the_mesh_live_in_a_real_browser() {
    let (chromium, chromedriver) = browser();
    let app = test_app();
    let p = Project::new(&format!(
        r#"
[mesh]
name = "shop"
shutdown_timeout = "10s"

[services.web]
command = ["sh", "-c", "echo url=$API_URL; exec {app}"]
upstreams = ["api"]
expose = "127.0.0.1:0"

[services.api]
command = ["sh", "-c", "echo url=$DB_URL; exec {app}"]
upstreams = ["db"]
replicas = 2
env = {{ TEST_APP_LOG = "1" }}

[services.db]
command = [{app:?}]

{legacy}
"#,
        legacy = LEGACY_BEFORE
    ));
    // Reloaded on SIGHUP only, so the test decides when.
    let mut mesh = p.up_reloading_by_hand(&[]);
    let admin = admin(&mesh);
    let web_ingress = ingress(&mesh, "web");
    let web_out = outbound(&mesh, "web");
    let api_out = outbound(&mesh, "api");
    let legacy_out = outbound(&mesh, "legacy");
    eventually("/ready to turn 200", T, || {
        (get(&admin, "/ready").ok()?.status == 200).then_some(())
    });

    // A refused call (403 `unauthorized`): `legacy` no longer lists `api` among its
    // upstreams, so `api`'s inbounds stop admitting it at once, but its replacement can
    // never be ready (its health check wants `API_URL`), so the old process keeps
    // running and calling `api` through its old outbound.
    let text = p.read("mesh.toml").replace(LEGACY_BEFORE, LEGACY_AFTER);
    p.write("mesh.toml", &text);
    mesh.signal(Signal::SIGHUP);
    eventually("legacy's calls to be refused as unauthorized", T, || {
        let r = get(&legacy_out, "/whoami").ok()?;
        (r.status == 403 && r.header("x-mesh-error") == Some("unauthorized")).then_some(())
    });

    // Steady traffic: ingress → web, web → api, api → db, legacy → api (refused).
    let traffic = Load::start(vec![
        (web_ingress.clone(), "/whoami"),
        (web_out, "/whoami"),
        (api_out, "/whoami"),
        (legacy_out, "/whoami"),
    ]);

    let driver = ChromeDriver::start(&chromedriver);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let client = rt.block_on(driver.connect(&chromium));
    let b = Browser {
        rt: &rt,
        client: &client,
    };
    b.goto(&format!("http://{admin}/"));

    // The stream is live and the header says what mesh this is.
    b.wait(
        "the live indicator",
        T,
        "return document.getElementById('live').dataset.state",
        |v| (v == "live").then_some(()),
    );
    let header = b.run("return document.getElementById('mesh-name').textContent");
    assert_eq!(header, "shop");

    // The graph shows the observed edges with a non-zero rate.
    let edges_js = "return [...document.querySelectorAll('#graph g.edge')].map(g => ({
        caller: g.dataset.caller, service: g.dataset.service, rps: Number(g.dataset.rps),
        idle: g.dataset.idle === 'true', refused: g.dataset.refused === 'true',
        mark: g.querySelector('[data-refused-mark]')?.textContent || null,
        label: g.querySelector('text.label')?.textContent || null }))";
    let edges = b.wait("observed edges with traffic", T, edges_js, |v| {
        let edges = v.as_array()?.clone();
        let live = |caller: &str, service: &str| {
            edges.iter().any(|e| {
                e["caller"] == caller
                    && e["service"] == service
                    && e["rps"].as_f64().is_some_and(|r| r > 0.0)
                    && e["idle"] == false
                    && e["label"].as_str().is_some_and(|l| l.contains("rps"))
            })
        };
        (live("ingress", "web") && live("web", "api") && live("api", "db")).then_some(edges)
    });
    assert!(!edges.is_empty());

    // The refused calls are marked on their edge.
    b.wait("the refused edge legacy → api", T, edges_js, |v| {
        v.as_array()?
            .iter()
            .any(|e| {
                e["caller"] == "legacy"
                    && e["service"] == "api"
                    && e["refused"] == true
                    && e["mark"].as_str().is_some_and(|m| m.contains("refused"))
            })
            .then_some(())
    });

    // A request with a known trace id shows in the live calls with that id.
    let trace = trace_id();
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let r = http(
        &web_ingress,
        "GET",
        "/whoami",
        &[("traceparent", &traceparent)],
        "",
    )
    .expect("traced request");
    assert_eq!(r.status, 200);
    let row_js = format!(
        "const tr = document.querySelector('#calls-body tr[data-trace=\"{trace}\"]');
         return tr ? [tr.dataset.caller, tr.dataset.service, tr.dataset.status,
                      tr.querySelector('td.trace').textContent] : null"
    );
    let row = b.wait("the traced call in the live calls", T, &row_js, |v| {
        (!v.is_null()).then(|| v.clone())
    });
    assert_eq!(row, json!(["ingress", "web", "200", trace]));
    // The filter keeps only what matches; pausing holds new calls back.
    b.type_into("#calls-filter", &trace);
    b.wait(
        "the filter to keep only the traced call",
        T,
        "return [...document.querySelectorAll('#calls-body tr')].map(tr => tr.dataset.trace)",
        |v| (v == &json!([trace])).then_some(()),
    );
    b.click("#calls-pause");
    assert_eq!(
        b.run("return document.getElementById('calls-pause').getAttribute('aria-pressed')"),
        "true"
    );
    b.click("#calls-pause");
    b.clear("#calls-filter");

    // A replica SIGKILLed shows as a restart in the services table within 2 s.
    let restarts_js = "const td = document.querySelector('#services-body tr[data-service=\"api\"] td[data-col=\"restarts\"]');
        return td ? Number(td.textContent) : null";
    let before = b.run(restarts_js);
    assert_eq!(before, 0, "{before}");
    let pid = pids_of(&mesh, app, "api", 0);
    assert_eq!(pid.len(), 1, "{pid:?}");
    let killed = Instant::now();
    let _ = kill(Pid::from_raw(pid[0]), Signal::SIGKILL);
    b.wait(
        "the restart in the table",
        Duration::from_secs(2),
        restarts_js,
        |v| (v.as_u64()? >= 1).then_some(()),
    );
    let shown_after = killed.elapsed();

    // A service's details: its replicas, its callers' endpoints, its last log lines.
    b.click("#graph g.node[data-node=\"api\"]");
    let detail_js = "const d = document.getElementById('detail');
        return d.hidden ? null : {
          service: d.dataset.service,
          replicas: document.querySelectorAll('#detail-replicas tbody tr').length,
          endpoints: [...document.querySelectorAll('#detail-endpoints [data-endpoint]')]
            .map(e => e.dataset.endpoint + ' ' + e.dataset.state),
          logs: document.getElementById('detail-logs').textContent }";
    b.wait("the details of api", T, detail_js, |v| {
        let ok = v["service"] == "api"
            && v["replicas"] == 2
            && v["endpoints"]
                .as_array()?
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.starts_with("api.1")))
            && v["logs"].as_str()?.contains("test-app api.");
        ok.then_some(())
    });
    // The table and the graph follow the picked window.
    b.click("#window-picker button[data-window=\"1m\"]");
    b.wait(
        "the 1m window",
        T,
        "return document.getElementById('graph-window').textContent",
        |v| (v == "last 1m").then_some(()),
    );
    b.wait(
        "the live indicator after reconnecting",
        T,
        "return document.getElementById('live').dataset.state",
        |v| (v == "live").then_some(()),
    );
    b.wait("observed edges in the 1m window", T, edges_js, |v| {
        v.as_array()?
            .iter()
            .any(|e| {
                e["caller"] == "web"
                    && e["service"] == "api"
                    && e["rps"].as_f64().is_some_and(|r| r > 0.0)
            })
            .then_some(())
    });

    let screenshot = target_dir().join("dashboard.png");
    let png = b.block(b.client.screenshot()).expect("screenshot");
    std::fs::write(&screenshot, &png).expect("write the screenshot");

    // Once the mesh is gone, the page says its figures are stale.
    assert!(traffic.finish() > 0);
    let pids: Vec<i32> = ["web", "db"]
        .iter()
        .flat_map(|s| pids_of(&mesh, app, s, 0))
        .chain(app_pids(&mesh, "api", 2))
        .collect();
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&pids, T);
    b.wait(
        "the stale indicator",
        T,
        "return document.getElementById('live').dataset.state",
        |v| (v == "stale").then_some(()),
    );

    rt.block_on(client.close()).expect("close the session");
    drop(driver);
    eprintln!(
        "dashboard test: browser part {:.1}s, restart shown {}ms after the SIGKILL, screenshot {}",
        started.elapsed().as_secs_f64(),
        shown_after.as_millis(),
        screenshot.display()
    );
}

/// `legacy` as first started: it calls `api`.
const LEGACY_BEFORE: &str = r#"[services.legacy]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]"#;

/// `legacy` no longer calling `api`, with a replacement that can never be ready.
const LEGACY_AFTER: &str = r#"[services.legacy]
command = ["sh", "-c", "echo url=${API_URL:-none}; exec sleep 1000"]
port = "none"
ready_timeout = "10m"
health = { exec = ["test", "-n", "${API_URL:-}"], interval = "200ms" }"#;

/// The Chromium and chromedriver executables, or a failure naming the packages.
fn browser() -> (PathBuf, PathBuf) {
    let find = |names: &[&str]| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
            .find(|p| p.is_file())
    };
    match (
        find(&["chromium", "chromium-browser"]),
        find(&["chromedriver"]),
    ) {
        (Some(chromium), Some(driver)) => (chromium, driver),
        _ => panic!(
            "the dashboard test needs Chromium and its WebDriver: install Debian's `chromium` \
             and `chromium-driver` packages (apt-get install chromium chromium-driver; .ci/run does)"
        ),
    }
}

/// Where cargo builds (`CARGO_TARGET_DIR` or `target/`): two levels above the binaries.
fn target_dir() -> PathBuf {
    Path::new(mesh_bin())
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

/// 32 hex digits, different for every run.
fn trace_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}{:016x}",
        nanos as u64 | 1,
        u64::from(std::process::id()) << 8 | 0xab
    )
}

/// chromedriver on a free port in a process group of its own (the browsers it starts
/// join it): stopped with the whole group, and proven gone, when dropped. Its `TMPDIR`
/// (the browser's profile and sockets) is a temporary directory removed after it.
struct ChromeDriver {
    child: Child,
    port: u16,
    /// Dropped after `drop` has stopped every process.
    _tmp: tempfile::TempDir,
}

impl ChromeDriver {
    fn start(path: &Path) -> ChromeDriver {
        let port = free_port();
        let tmp = tempfile::Builder::new()
            .prefix("mesh-test-chromium")
            .tempdir()
            .expect("tempdir");
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        let driver = ChromeDriver {
            child,
            port,
            _tmp: tmp,
        };
        eventually("chromedriver to listen", T, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        driver
    }

    async fn connect(&self, chromium: &Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1400,1500",
                    "--force-prefers-reduced-motion", "--hide-scrollbars",
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a WebDriver session")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        let group = descendants(pid);
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        // Anything that left the group (a browser helper in a session of its own).
        for p in &group {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let mut all = group;
            all.push(pid);
            assert_gone(&all, Duration::from_secs(10));
        }
    }
}

/// Every live descendant of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let all: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    all.into_iter()
        .filter(|p| {
            let mut q = *p;
            while let Some(parent) = parent_of(q) {
                if parent == pid {
                    return true;
                }
                if parent <= 1 {
                    return false;
                }
                q = parent;
            }
            false
        })
        .collect()
}

/// The WebDriver session, used from synchronous test code.
struct Browser<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a Client,
}

impl Browser<'_> {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn goto(&self, url: &str) {
        self.block(self.client.goto(url)).expect("open the page");
    }

    /// The value of a script's `return`.
    fn run(&self, script: &str) -> Value {
        self.block(self.client.execute(script, Vec::new()))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Poll `script` until `check` accepts its value, or fail after `limit`.
    fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        script: &str,
        check: impl Fn(&Value) -> Option<T>,
    ) -> T {
        let mut last = Value::Null;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(what, limit, || {
                last = self.block(self.client.execute(script, Vec::new())).ok()?;
                check(&last)
            })
        }));
        match found {
            Ok(v) => v,
            Err(_) => {
                panic!("timed out after {limit:?} waiting for {what}; the page last said {last}")
            }
        }
    }

    /// Click the element `css` finds; found again if the page replaced it in between.
    fn click(&self, css: &str) {
        let mut last = String::new();
        let clicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(&format!("a click on {css}"), T, || {
                let result = self.block(async {
                    let element = self.client.find(Locator::Css(css)).await?;
                    element.click().await
                });
                result.map_err(|e| last = e.to_string()).ok()
            })
        }));
        if clicked.is_err() {
            panic!("cannot click {css}: {last}");
        }
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self
            .block(self.client.find(Locator::Css(css)))
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        self.block(element.send_keys(text))
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    fn clear(&self, css: &str) {
        let element = self
            .block(self.client.find(Locator::Css(css)))
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        self.block(element.clear())
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        // `clear` fires no input event: tell the page.
        self.run(
            "document.querySelector('#calls-filter').dispatchEvent(new Event('input')); return null",
        );
    }
}

/// A few requests every 100 ms through each address, on kept-alive connections, until
/// finished (bounded by the test's own length).
struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Load {
    fn start(targets: Vec<(String, &'static str)>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<_> = targets.iter().map(|_| None).collect();
            let mut ok = 0;
            let deadline = Instant::now() + patience(Duration::from_secs(300));
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                for ((addr, path), conn) in targets.iter().zip(conns.iter_mut()) {
                    match request(conn, addr, path) {
                        Ok(200) => ok += 1,
                        Ok(_) => {}
                        Err(_) => *conn = None,
                    }
                }
                // Pacing of the load, not a wait for anything.
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        Load { stop, thread }
    }

    /// Stop; how many requests were answered 200.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("load thread")
    }
}
