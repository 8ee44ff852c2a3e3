//! The peers measured beside the mesh path: well-known proxies put in front of the same
//! app, each as the same kind of path (client → proxy → … → app) on 127.0.0.1.
//!
//! * `haproxy-mtls`: two haproxy processes; the first takes plain HTTP/1.1 and forwards
//!   over mutual TLS (TLS 1.3, client certificate required and verified against a
//!   throwaway CA, the server's name verified) to the second, which forwards plain
//!   HTTP/1.1 to the app. The same shape as the mesh path with `local_path = "tls"`: an
//!   outbound, an encrypted hop, an inbound.
//! * `nginx-mtls`: the same two hops with two nginx processes.
//! * `haproxy-plain`: one haproxy hop, plain HTTP/1.1 on both sides.
//!
//! Every process runs one worker thread, keeps connections alive on both sides, logs
//! nothing, and gets its configuration, certificates, pid and temp files in the bench's
//! scratch directory, so a peer runs as any user and leaves nothing behind. The
//! certificates (ECDSA P-256 keys, like the mesh's) are made with the `openssl` command
//! rather than rcgen: only `proxy::tls` touches rcgen (ARCHITECTURE.md), and the root
//! package does not depend on it.
//!
//! A peer whose executables are missing is skipped with a note naming
//! `scripts/install-bench-deps`, never a failure of the run.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::load::{self, Target};
use crate::procs::{self, ChildProcess};

/// How a skipped peer can be installed.
pub(crate) const INSTALL_HINT: &str = "install it with scripts/install-bench-deps";

/// One kind of peer path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    HaproxyMtls,
    NginxMtls,
    HaproxyPlain,
}

impl Peer {
    pub(crate) const ALL: [Peer; 3] = [Peer::HaproxyMtls, Peer::NginxMtls, Peer::HaproxyPlain];

    /// Its name in the table, in `--peers` and in the summary.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::HaproxyMtls => "haproxy-mtls",
            Self::NginxMtls => "nginx-mtls",
            Self::HaproxyPlain => "haproxy-plain",
        }
    }

    /// The executables it needs.
    fn needs(self) -> &'static [Tool] {
        match self {
            Self::HaproxyMtls => &[Tool::Haproxy, Tool::Openssl],
            Self::NginxMtls => &[Tool::Nginx, Tool::Openssl],
            Self::HaproxyPlain => &[Tool::Haproxy],
        }
    }

    fn has_tls(self) -> bool {
        matches!(self, Self::HaproxyMtls | Self::NginxMtls)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--peers`: a comma-separated list of peer names (`all`, or `none`).
pub(crate) fn parse_peers(s: &str) -> Result<Vec<Peer>, String> {
    let mut peers = Vec::new();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "all" => peers.extend(Peer::ALL),
            "none" => {}
            _ => {
                let peer = Peer::ALL
                    .into_iter()
                    .find(|p| p.name() == word)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Peer::ALL.iter().map(|p| p.name()).collect();
                        format!(
                            "unknown peer {word:?}: expected {}, all or none",
                            names.join(", ")
                        )
                    })?;
                peers.push(peer);
            }
        }
    }
    let mut unique = Vec::new();
    for p in peers {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    Ok(unique)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Haproxy,
    Nginx,
    Openssl,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::Openssl => "openssl",
        }
    }
}

/// The executables the peers need, found on `PATH` or in the usual `sbin` directories
/// (which a user's `PATH` often lacks).
pub(crate) struct Tools {
    haproxy: Option<PathBuf>,
    nginx: Option<PathBuf>,
    openssl: Option<PathBuf>,
}

impl Tools {
    pub(crate) fn find() -> Self {
        Self {
            haproxy: find_executable("haproxy"),
            nginx: find_executable("nginx"),
            openssl: find_executable("openssl"),
        }
    }

    fn get(&self, tool: Tool) -> Option<&Path> {
        match tool {
            Tool::Haproxy => self.haproxy.as_deref(),
            Tool::Nginx => self.nginx.as_deref(),
            Tool::Openssl => self.openssl.as_deref(),
        }
    }

    /// Why `peer` cannot run here (its missing executables), if it cannot.
    pub(crate) fn missing(&self, peer: Peer) -> Option<String> {
        let missing: Vec<&str> = peer
            .needs()
            .iter()
            .filter(|t| self.get(**t).is_none())
            .map(|t| t.name())
            .collect();
        (!missing.is_empty()).then(|| format!("{} not found", missing.join(" and ")))
    }

    /// One line naming the version of each executable a peer of `peers` uses.
    pub(crate) fn versions(&self, peers: &[Peer]) -> String {
        [Tool::Haproxy, Tool::Nginx, Tool::Openssl]
            .into_iter()
            .filter(|t| peers.iter().any(|p| p.needs().contains(t)))
            .filter_map(|t| Some((t, self.get(t)?)))
            .map(|(t, path)| format!("{} ({})", version(t, path), path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn find_executable(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `HAProxy 2.6.12`, `nginx/1.22.1`, `OpenSSL 3.0.19`: the first line of its version
/// output, trimmed to the name and number.
fn version(tool: Tool, path: &Path) -> String {
    let arg = match tool {
        Tool::Haproxy | Tool::Nginx => "-v",
        Tool::Openssl => "version",
    };
    let out = Command::new(path).arg(arg).stdin(Stdio::null()).output();
    let Ok(out) = out else {
        return format!("{} (version unknown)", tool.name());
    };
    // nginx prints its version on stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().next().unwrap_or_default();
    match tool {
        // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        Tool::Haproxy => line
            .split_whitespace()
            .nth(2)
            .map_or_else(|| line.to_owned(), |v| format!("HAProxy {v}")),
        // "nginx version: nginx/1.22.1"
        Tool::Nginx => line
            .rsplit(' ')
            .next()
            .map_or_else(|| line.to_owned(), str::to_owned),
        // "OpenSSL 3.0.19 27 Jan 2026"
        Tool::Openssl => line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The throwaway CA and the two leaves of the TLS peers, as files.
pub(crate) struct Certs {
    ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    client_crt: PathBuf,
    client_key: PathBuf,
    /// Certificate and key in one file, as haproxy's `crt` wants them.
    server_pem: PathBuf,
    client_pem: PathBuf,
}

/// The name in the server's certificate, which the first hop verifies.
const SERVER_NAME: &str = "localhost";

/// What `openssl` reads: the extensions of the CA and of each leaf.
const OPENSSL_CNF: &str = "\
# Written by mesh-bench: a throwaway CA for its peers, valid for a day.
[req]
distinguished_name = dn
prompt = no
[dn]
CN = mesh-bench
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:bench-client
authorityKeyIdentifier = keyid
";

/// Makes the CA and the leaves in `dir` (created) with the `openssl` command, if a TLS
/// peer is among `peers` and openssl is there; `None` otherwise.
pub(crate) fn make_certs(
    tools: &Tools,
    peers: &[Peer],
    dir: &Path,
) -> anyhow::Result<Option<Certs>> {
    let Some(openssl) = tools.get(Tool::Openssl) else {
        return Ok(None);
    };
    if !peers.iter().any(|p| p.has_tls()) {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cnf = dir.join("openssl.cnf");
    write(&cnf, OPENSSL_CNF)?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(openssl)
            .args(args)
            .current_dir(dir)
            .env("OPENSSL_CONF", &cnf)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", openssl.display()))?;
        if !out.status.success() {
            bail!(
                "openssl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let key = |name: &str| {
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    };
    key("ca.key")?;
    run(&[
        "req",
        "-config",
        "openssl.cnf",
        "-new",
        "-x509",
        "-key",
        "ca.key",
        "-subj",
        "/CN=mesh-bench throwaway CA",
        "-extensions",
        "ca",
        "-days",
        "1",
        "-out",
        "ca.crt",
    ])?;
    for (leaf, cn, serial) in [
        ("server", SERVER_NAME, "2"),
        ("client", "bench-client", "3"),
    ] {
        let (key_file, csr, crt) = (
            format!("{leaf}.key"),
            format!("{leaf}.csr"),
            format!("{leaf}.crt"),
        );
        key(&key_file)?;
        run(&[
            "req",
            "-config",
            "openssl.cnf",
            "-new",
            "-key",
            &key_file,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &csr,
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "1",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            leaf,
            "-out",
            &crt,
        ])?;
        let pem = format!("{}{}", read(&dir.join(&crt))?, read(&dir.join(&key_file))?);
        write(&dir.join(format!("{leaf}.pem")), &pem)?;
    }
    Ok(Some(Certs {
        ca: dir.join("ca.crt"),
        server_crt: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_crt: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        server_pem: dir.join("server.pem"),
        client_pem: dir.join("client.pem"),
    }))
}

/// One running peer path.
pub(crate) struct PeerRun {
    pub(crate) peer: Peer,
    /// Its processes, in the order of the path (the one the client talks to first).
    children: Vec<(&'static str, ChildProcess)>,
    /// Every process whose CPU time counts: the children and whatever they forked.
    pub(crate) pids: Vec<i32>,
    /// Where the client sends its requests.
    pub(crate) via: Arc<Target>,
    /// The path, for the header: `client → haproxy 127.0.0.1:A → …`.
    pub(crate) description: String,
}

impl PeerRun {
    /// The last output lines of each process, for error messages.
    pub(crate) fn context(&self) -> String {
        self.children
            .iter()
            .map(|(role, c)| format!("=== {} {role} ===\n{}", self.peer, c.context()))
            .collect()
    }

    /// Peak RSS (`VmHWM`) of every process of the path, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> anyhow::Result<Vec<u64>> {
        self.pids
            .iter()
            .map(|&p| procs::status_kib(p, "VmHWM"))
            .collect()
    }

    /// Stops every process (SIGTERM, then SIGKILL); says which did not stop in time.
    pub(crate) fn stop(&mut self, timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for (role, child) in &mut self.children {
            if let Err(e) = child.stop(timeout) {
                problems.push(format!("{} {role}: {e:#}", self.peer));
            }
        }
        problems
    }
}

/// Starts `peer` in front of `app`, its files in `dir`, and waits until its path
/// answers; one more try on fresh ports when it does not start (another program can take
/// a port between the bench choosing it and the proxy binding it).
pub(crate) fn start(
    peer: Peer,
    tools: &Tools,
    certs: Option<&Certs>,
    dir: &Path,
    app: SocketAddr,
    rt: &tokio::runtime::Runtime,
    within: Duration,
) -> anyhow::Result<PeerRun> {
    match start_once(peer, tools, certs, &dir.join("try1"), app, rt, within) {
        Ok(run) => Ok(run),
        Err(e) => {
            let first = format!("{e:#}");
            let first = first.lines().next().unwrap_or_default();
            eprintln!("mesh-bench: warning: {peer} did not start ({first}); trying once more");
            start_once(peer, tools, certs, &dir.join("try2"), app, rt, within)
        }
    }
}

fn start_once(
    peer: Peer,
    tools: &Tools,
    certs: Option<&Certs>,
    dir: &Path,
    app: SocketAddr,
    rt: &tokio::runtime::Runtime,
    within: Duration,
) -> anyhow::Result<PeerRun> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tool = |t: Tool| {
        tools
            .get(t)
            .with_context(|| format!("{} not found; {INSTALL_HINT}", t.name()))
    };
    let need_certs = || certs.context("no certificates (openssl not found)");
    let [front, back] = free_ports::<2>()?;
    let mut children = Vec::new();
    let description = match peer {
        Peer::HaproxyMtls => {
            let haproxy = tool(Tool::Haproxy)?;
            let certs = need_certs()?;
            // The inner hop first: the first one has somewhere to connect to sooner.
            let inner = dir.join("inner.cfg");
            write(&inner, &haproxy_tls_inner(back, app, certs)?)?;
            children.push(("inner", spawn_haproxy(haproxy, &inner)?));
            let outer = dir.join("outer.cfg");
            write(&outer, &haproxy_tls_outer(front, back, certs)?)?;
            children.insert(0, ("outer", spawn_haproxy(haproxy, &outer)?));
            format!("client → haproxy 127.0.0.1:{front} → mTLS → haproxy 127.0.0.1:{back} → app")
        }
        Peer::NginxMtls => {
            let nginx = tool(Tool::Nginx)?;
            let certs = need_certs()?;
            let inner = dir.join("inner");
            let conf = nginx_tls_inner(&inner, back, app, certs)?;
            children.push(("inner", spawn_nginx(nginx, &inner, &conf)?));
            let outer = dir.join("outer");
            let conf = nginx_tls_outer(&outer, front, back, certs)?;
            children.insert(0, ("outer", spawn_nginx(nginx, &outer, &conf)?));
            format!("client → nginx 127.0.0.1:{front} → mTLS → nginx 127.0.0.1:{back} → app")
        }
        Peer::HaproxyPlain => {
            let haproxy = tool(Tool::Haproxy)?;
            let cfg = dir.join("plain.cfg");
            write(&cfg, &haproxy_plain(front, app))?;
            children.push(("hop", spawn_haproxy(haproxy, &cfg)?));
            format!("client → haproxy 127.0.0.1:{front} → app")
        }
    };
    let via = Target::new(SocketAddr::from((Ipv4Addr::LOCALHOST, front)))?;

    // Ready when a request through the whole path answers 200; a process that exits
    // before is an error at once, with its output.
    let deadline = Instant::now() + within;
    loop {
        for (role, child) in &mut children {
            if let Some(status) = child.exited() {
                bail!(
                    "{peer} {role} exited ({status}) before its path answered\n{}",
                    child.context()
                );
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rt.block_on(load::wait_ok(&via, left.min(Duration::from_millis(300)))) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                let context: String = children
                    .iter()
                    .map(|(role, c)| format!("=== {peer} {role} ===\n{}", c.context()))
                    .collect();
                bail!("{peer}: {e:#}\n{context}");
            }
            Err(_) => {}
        }
    }

    let mut pids = Vec::new();
    for (_, child) in &children {
        pids.push(child.pid());
        pids.extend(procs::descendants(child.pid())?);
    }
    Ok(PeerRun {
        peer,
        children,
        pids,
        via,
        description,
    })
}

fn spawn_haproxy(haproxy: &Path, cfg: &Path) -> anyhow::Result<ChildProcess> {
    let mut command = Command::new(haproxy);
    // -db: stay in the foreground (no daemon, no master process).
    command.arg("-db").arg("-f").arg(cfg);
    ChildProcess::spawn(command)
}

fn spawn_nginx(nginx: &Path, prefix: &Path, conf: &Path) -> anyhow::Result<ChildProcess> {
    let mut command = Command::new(nginx);
    // -p: the prefix for relative paths; -e: the log of the start, before the
    // configuration is read (the default is a system path on some builds).
    command
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg("stderr");
    ChildProcess::spawn(command)
}

/// What both haproxy configurations share: one thread, no logging, keep-alive on both
/// sides, idle server connections shared by every client connection.
const HAPROXY_COMMON: &str = "\
global
    nbthread 1
    maxconn 4096
    # No `log` line: haproxy logs nothing.

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
";

/// The first hop of `haproxy-mtls`: plain HTTP/1.1 in, mutual TLS out.
fn haproxy_tls_outer(front: u16, back: u16, certs: &Certs) -> anyhow::Result<String> {
    Ok(format!(
        "# Written by mesh-bench: the first hop of haproxy-mtls.
{HAPROXY_COMMON}
frontend plain_in
    bind 127.0.0.1:{front}
    default_backend tls_out

backend tls_out
    # TLS 1.3, this client's certificate, the server's chain verified against the CA and
    # its name against {SERVER_NAME}.
    server inner 127.0.0.1:{back} ssl ssl-min-ver TLSv1.3 crt {client} ca-file {ca} verify required verifyhost {SERVER_NAME}
",
        client = path_str(&certs.client_pem)?,
        ca = path_str(&certs.ca)?,
    ))
}

/// The second hop of `haproxy-mtls`: mutual TLS in (a client certificate required),
/// plain HTTP/1.1 to the app.
fn haproxy_tls_inner(back: u16, app: SocketAddr, certs: &Certs) -> anyhow::Result<String> {
    Ok(format!(
        "# Written by mesh-bench: the second hop of haproxy-mtls.
{HAPROXY_COMMON}
frontend tls_in
    bind 127.0.0.1:{back} ssl ssl-min-ver TLSv1.3 crt {server} ca-file {ca} verify required
    default_backend app

backend app
    server app {app}
",
        server = path_str(&certs.server_pem)?,
        ca = path_str(&certs.ca)?,
    ))
}

/// `haproxy-plain`: one hop, plain HTTP/1.1 on both sides.
fn haproxy_plain(front: u16, app: SocketAddr) -> String {
    format!(
        "# Written by mesh-bench: haproxy-plain.
{HAPROXY_COMMON}
frontend plain_in
    bind 127.0.0.1:{front}
    default_backend app

backend app
    server app {app}
"
    )
}

/// The part of an nginx configuration both hops share, with its own prefix `dir` (pid
/// file, temp dirs): one process (`master_process off`), in the foreground, no access log,
/// no request limit per connection on either side (nginx closes a keep-alive connection
/// after 1000 requests by default; haproxy and the mesh do not).
fn nginx_head(dir: &Path) -> anyhow::Result<String> {
    for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let d = dir.join("temp").join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let dir = path_str(dir)?;
    Ok(format!(
        "# Written by mesh-bench.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}
"
    ))
}

/// What the `http` block of both hops starts with.
fn nginx_http_common(dir: &Path) -> anyhow::Result<String> {
    let dir = path_str(dir)?;
    Ok(format!(
        "    access_log off;
    client_body_temp_path {dir}/temp/client_body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
"
    ))
}

/// The first hop of `nginx-mtls`: plain HTTP/1.1 in, mutual TLS out; returns the path
/// of its configuration file.
fn nginx_tls_outer(dir: &Path, front: u16, back: u16, certs: &Certs) -> anyhow::Result<PathBuf> {
    let text = format!(
        "{head}
http {{
{common}
    upstream inner {{
        server 127.0.0.1:{back};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{front};

        location / {{
            proxy_pass https://inner;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {client_crt};
            proxy_ssl_certificate_key {client_key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {SERVER_NAME};
            proxy_ssl_session_reuse on;
        }}
    }}
}}
",
        head = nginx_head(dir)?,
        common = nginx_http_common(dir)?,
        client_crt = path_str(&certs.client_crt)?,
        client_key = path_str(&certs.client_key)?,
        ca = path_str(&certs.ca)?,
    );
    let conf = dir.join("nginx.conf");
    write(&conf, &text)?;
    Ok(conf)
}

/// The second hop of `nginx-mtls`: mutual TLS in (a client certificate required), plain
/// HTTP/1.1 to the app.
fn nginx_tls_inner(
    dir: &Path,
    back: u16,
    app: SocketAddr,
    certs: &Certs,
) -> anyhow::Result<PathBuf> {
    let text = format!(
        "{head}
http {{
{common}
    upstream app {{
        server {app};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{back} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;

        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        head = nginx_head(dir)?,
        common = nginx_http_common(dir)?,
        server_crt = path_str(&certs.server_crt)?,
        server_key = path_str(&certs.server_key)?,
        ca = path_str(&certs.ca)?,
    );
    let conf = dir.join("nginx.conf");
    write(&conf, &text)?;
    Ok(conf)
}

/// `N` distinct free loopback ports (bound together, then released, as mesh assigns
/// ports).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
        *port = l.local_addr().context("finding a free port")?.port();
        listeners.push(l);
    }
    Ok(ports)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains(|c: char| c.is_whitespace() || c == ';' || c == '"' || c == '#') {
        bail!(
            "{s:?}: the scratch directory's path must not hold spaces, quotes, ';' or '#' (set TMPDIR)"
        );
    }
    Ok(s)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_flag() {
        assert_eq!(parse_peers("all"), Ok(Peer::ALL.to_vec()));
        assert_eq!(
            parse_peers("haproxy-plain,nginx-mtls"),
            Ok(vec![Peer::HaproxyPlain, Peer::NginxMtls])
        );
        assert_eq!(parse_peers("none"), Ok(vec![]));
        assert!(parse_peers("envoy").is_err());
    }
}
