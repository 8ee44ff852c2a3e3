//! Steady keep-alive traffic through an address, for tests that prove a change is
//! invisible to clients (rolling replacements).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::patience;

/// Steady keep-alive traffic (about 200 requests per second over two connections)
/// through an address, counting every request that did not succeed.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    pub fn start(addr: &str, path: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..2)
            .map(|_| {
                let (stop, ok, failed, errors) = (
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    Arc::clone(&errors),
                );
                let (addr, path) = (addr.to_string(), path.to_string());
                std::thread::spawn(move || {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while !stop.load(Ordering::SeqCst) {
                        match request(&mut conn, &addr, &path) {
                            Ok(200) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(status) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors
                                    .lock()
                                    .expect("lock")
                                    .push(format!("status {status}"));
                            }
                            Err(e) => {
                                conn = None;
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.lock().expect("lock").push(e.to_string());
                            }
                        }
                        // Pacing of the load (about 100 requests per second per
                        // connection), not a wait for anything.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stop; (succeeded, failed, the failures).
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("traffic thread");
        }
        let errors = self.errors.lock().expect("lock").clone();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}

/// One GET on a kept-alive connection (opened if needed); the status.
pub fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: &str,
    path: &str,
) -> std::io::Result<u16> {
    if conn.is_none() {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(patience(Duration::from_secs(10))))?;
        *conn = Some(BufReader::new(s));
    }
    let Some(reader) = conn.as_mut() else {
        return Err(std::io::Error::other("no connection"));
    };
    write!(
        reader.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    )?;
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut length = 0usize;
    let mut close = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    if close {
        *conn = None;
    }
    Ok(status)
}
