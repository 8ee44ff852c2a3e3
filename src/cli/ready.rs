//! The first minute (SPEC §4): once every started service is ready, one line says so and
//! where to go; again as `ready again` after the mesh was not ready and is again.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_supervisor::config::Protocol;
use mesh_supervisor::logs::LogSink;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::runtime::Runtime;

/// The last ready line said, for `mesh up --wait` to print.
pub(crate) type LastReady = Arc<Mutex<Option<String>>>;

/// Say when the mesh becomes ready, for as long as it runs.
pub(crate) async fn announce(
    mesh: Runtime,
    admin: Option<SocketAddr>,
    started: Instant,
    logs: LogSink,
    last: LastReady,
) {
    let mut status = mesh.status();
    let mut first = true;
    loop {
        let counts = match status
            .wait_for(|all| !all.is_empty() && all.values().all(|r| r.ready))
            .await
        {
            Ok(all) => {
                let services: std::collections::BTreeSet<&str> =
                    all.values().map(|r| r.service.as_str()).collect();
                (services.len(), all.len())
            }
            Err(_) => return,
        };
        let head = if first {
            let secs = started.elapsed().as_secs_f64();
            format!("ready in {secs:.1}s")
        } else {
            "ready again".to_string()
        };
        first = false;
        let (services, replicas) = counts;
        let mut line = format!(
            "{head}: {services} {}, {replicas} {}",
            plural(services, "service", "services"),
            plural(replicas, "replica", "replicas"),
        );
        let where_to = urls(&mesh, admin);
        if !where_to.is_empty() {
            line.push_str(" · ");
            line.push_str(&where_to);
        }
        logs.mesh_line(&line);
        *last.lock() = Some(line);
        if status
            .wait_for(|all| !all.values().all(|r| r.ready))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Each exposed service with its URL (`ADDR` for tcp), then the dashboard:
/// `web http://127.0.0.1:8080 · dashboard http://127.0.0.1:41873/`.
pub(crate) fn urls(mesh: &Runtime, admin: Option<SocketAddr>) -> String {
    let config = mesh.config();
    let mut parts: Vec<String> = mesh
        .ingress_addrs()
        .into_iter()
        .map(|(service, addr)| {
            let tcp = config
                .services
                .get(&service)
                .is_some_and(|s| s.protocol == Protocol::Tcp);
            if tcp {
                format!("{service} {addr}")
            } else {
                format!("{service} http://{addr}")
            }
        })
        .collect();
    if let Some(admin) = admin {
        parts.push(format!("dashboard http://{admin}/"));
    }
    parts.join(" · ")
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
