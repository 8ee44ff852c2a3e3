//! Checks of `traffic` and `routes`.

// The parent's types and helpers are this module's vocabulary.
use super::*;
use crate::config::model::{
    CircuitBreaker, Fault, LoadBalancer, RateLimit, Retries, RetryOn, Route, Traffic,
};
use crate::config::raw::{RawCircuitBreaker, RawFault, RawRateLimit, RawRetries};

pub(super) fn check_traffic(ctx: &mut Ctx<'_>, t: &RawTraffic) -> Traffic {
    let mut traffic = Traffic::default();
    if let Some(timeout) = &t.timeout {
        traffic.timeout = positive_duration(ctx, timeout, "traffic.timeout");
    }
    if let Some(lb) = &t.load_balancer {
        if let Some(lb) = one_of(
            ctx,
            lb,
            "traffic.load_balancer",
            &[
                ("p2c-ewma", LoadBalancer::P2cEwma),
                ("round-robin", LoadBalancer::RoundRobin),
            ],
        ) {
            traffic.load_balancer = lb;
        }
    }
    if let Some(r) = &t.retries {
        traffic.retries = Some(check_retries(ctx, r, traffic.timeout));
    }
    if let Some(cb) = &t.circuit_breaker {
        traffic.circuit_breaker = Some(check_circuit_breaker(ctx, cb));
    }
    if let Some(rl) = &t.rate_limit {
        traffic.rate_limit = check_rate_limit(ctx, rl.get_ref(), rl.span());
    }
    at_least(ctx, t.max_concurrent.as_ref(), 1, "traffic.max_concurrent");
    if let Some(n) = &t.max_concurrent {
        traffic.max_concurrent = clamp_u32(*n.get_ref());
    }
    if let Some(q) = &t.queue_timeout {
        if let Some(q) = duration(ctx, q, "traffic.queue_timeout") {
            traffic.queue_timeout = q;
        }
    }
    traffic
}

/// `rate_limit = { rps, burst }`: `rps` is required; `burst` defaults to one second's
/// worth of tokens (`rps` rounded up, at least 1).
fn check_rate_limit(ctx: &mut Ctx<'_>, rl: &RawRateLimit, span: Range<usize>) -> Option<RateLimit> {
    let rps = match &rl.rps {
        Some(rps) if rps.get_ref().is_finite() && *rps.get_ref() > 0.0 => Some(*rps.get_ref()),
        Some(rps) => {
            ctx.error(
                rps.span(),
                "`traffic.rate_limit.rps` must be greater than 0",
            );
            None
        }
        None => {
            ctx.error(span, "`rate_limit` needs `rps`");
            None
        }
    };
    let burst = match &rl.burst {
        None => None,
        Some(b) if *b.get_ref() < 1 => {
            ctx.error(b.span(), "`traffic.rate_limit.burst` must be at least 1");
            return None;
        }
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(n) => Some(n),
            Err(_) => {
                ctx.error(b.span(), "`traffic.rate_limit.burst` is too large");
                return None;
            }
        },
    };
    let rps = rps?;
    // Saturating float-to-int cast: a huge rps gives the largest burst.
    let burst = burst.unwrap_or((rps.ceil() as u32).max(1));
    Some(RateLimit { rps, burst })
}

fn check_retries(ctx: &mut Ctx<'_>, r: &RawRetries, timeout: Option<Duration>) -> Retries {
    let mut retries = Retries {
        attempts: 3,
        per_try_timeout: None,
        on: vec![RetryOn::GatewayError],
        budget: 0.2,
    };
    at_least(ctx, r.attempts.as_ref(), 1, "traffic.retries.attempts");
    if let Some(a) = &r.attempts {
        retries.attempts = clamp_u32(*a.get_ref());
    }
    if let Some(d) = &r.per_try_timeout {
        retries.per_try_timeout = positive_duration(ctx, d, "traffic.retries.per_try_timeout");
        if let (Some(per_try), Some(timeout)) = (retries.per_try_timeout, timeout) {
            if per_try > timeout {
                ctx.error(
                    d.span(),
                    format!(
                        "`traffic.retries.per_try_timeout` ({per_try:?}) is longer than `traffic.timeout` ({timeout:?}): no retry could ever start"
                    ),
                );
            }
        }
    }
    if let Some(on) = &r.on {
        retries.on = on
            .iter()
            .filter_map(|condition| check_retry_condition(ctx, condition))
            .collect();
    }
    if let Some(budget) = &r.budget {
        let b = *budget.get_ref();
        if !(b.is_finite() && (0.0..=1.0).contains(&b)) {
            ctx.error(
                budget.span(),
                format!("`traffic.retries.budget` must be between 0 and 1, not {b}"),
            );
        } else {
            retries.budget = b;
        }
    }
    retries
}

fn check_circuit_breaker(ctx: &mut Ctx<'_>, cb: &RawCircuitBreaker) -> CircuitBreaker {
    let mut breaker = CircuitBreaker {
        consecutive_failures: 5,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(60),
        max_ejected_percent: 50,
    };
    at_least(
        ctx,
        cb.consecutive_failures.as_ref(),
        1,
        "traffic.circuit_breaker.consecutive_failures",
    );
    if let Some(n) = &cb.consecutive_failures {
        breaker.consecutive_failures = clamp_u32(*n.get_ref());
    }
    let base = cb
        .base_ejection
        .as_ref()
        .and_then(|d| positive_duration(ctx, d, "traffic.circuit_breaker.base_ejection"));
    let max = cb
        .max_ejection
        .as_ref()
        .and_then(|d| positive_duration(ctx, d, "traffic.circuit_breaker.max_ejection"));
    breaker.base_ejection = base.unwrap_or(breaker.base_ejection);
    breaker.max_ejection = max.unwrap_or(breaker.max_ejection);
    let span = cb
        .base_ejection
        .as_ref()
        .or(cb.max_ejection.as_ref())
        .map(Spanned::span);
    if let Some(span) = span {
        if (base.is_some() || cb.base_ejection.is_none())
            && (max.is_some() || cb.max_ejection.is_none())
            && breaker.base_ejection > breaker.max_ejection
        {
            ctx.error(
                span,
                format!(
                    "`base_ejection` ({:?}) is greater than `max_ejection` ({:?})",
                    breaker.base_ejection, breaker.max_ejection
                ),
            );
        }
    }
    let max_ejected = cb
        .max_ejected_percent
        .as_ref()
        .map(|p| (p.span(), *p.get_ref() as f64));
    percent(
        ctx,
        max_ejected,
        "traffic.circuit_breaker.max_ejected_percent",
    );
    if let Some(p) = &cb.max_ejected_percent {
        breaker.max_ejected_percent = (*p.get_ref()).clamp(0, 100) as u32;
    }
    breaker
}

/// A duration that must not be zero (a zero timeout or ejection would be meaningless).
fn positive_duration(
    ctx: &mut Ctx<'_>,
    value: &Spanned<DurationStr>,
    key: &str,
) -> Option<Duration> {
    let d = duration(ctx, value, key)?;
    if d.is_zero() {
        ctx.error(value.span(), format!("`{key}` must be greater than 0"));
        return None;
    }
    Some(d)
}

/// A count checked by `at_least` elsewhere, as a `u32` (huge values saturate).
fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

fn check_retry_condition(ctx: &mut Ctx<'_>, condition: &Spanned<String>) -> Option<RetryOn> {
    let c = condition.get_ref().as_str();
    let parsed = match c {
        "gateway-error" => Some(RetryOn::GatewayError),
        "5xx" => Some(RetryOn::ServerError),
        "reset" => Some(RetryOn::Reset),
        "timeout" => Some(RetryOn::Timeout),
        _ => c
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .map(RetryOn::Status)
            .or_else(|| {
                let code = c.strip_prefix("grpc:")?;
                let index = GRPC_CODES.iter().position(|name| *name == code)?;
                Some(RetryOn::Grpc(index as u32 + 1))
            }),
    };
    if parsed.is_none() {
        let help = suggest(c, ["gateway-error", "5xx", "reset", "timeout"].into_iter())
            .map(|s| format!("did you mean `{s}`?"));
        ctx.report(
            condition.span(),
            format!("invalid retry condition \"{c}\": expected `gateway-error`, `5xx`, `reset`, `timeout`, a status code or `grpc:<code-name>`"),
            help,
        );
    }
    parsed
}

/// gRPC status code names, in code order from 1 (`cancelled`).
const GRPC_CODES: &[&str] = &[
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// Checks one route of `service`; returns it when valid.
pub(super) fn check_route(
    ctx: &mut Ctx<'_>,
    route: &Spanned<RawRoute>,
    service: &str,
    protocol: Protocol,
    scope: &Scope<'_>,
) -> Option<Route> {
    let errors_before = ctx.diags.len();
    let r = route.get_ref();
    if protocol == Protocol::Tcp {
        let header_span = r
            .headers
            .as_ref()
            .map(|h| h.0.first().map_or(route.span(), |(name, _)| name.span()));
        let set = [
            ("path_prefix", r.path_prefix.as_ref().map(Spanned::span)),
            ("headers", header_span),
            ("timeout", r.timeout.as_ref().map(Spanned::span)),
            ("fault", r.fault.as_ref().map(Spanned::span)),
        ];
        for (key, span) in set {
            if let Some(span) = span {
                ctx.error(
                    span,
                    format!("`{key}` is not allowed in a route of tcp service `{service}`: tcp routes may only set `backends`"),
                );
            }
        }
    }
    let path_prefix = r.path_prefix.as_ref().map(|prefix| {
        let p = prefix.get_ref();
        if !p.starts_with('/') {
            ctx.error(prefix.span(), "`path_prefix` must start with `/`");
        } else if p.contains(['?', '#']) || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            ctx.error(
                prefix.span(),
                "`path_prefix` must be a path, without spaces, query or fragment",
            );
        } else if !p.is_ascii() {
            // Request paths are percent-encoded: a raw "é" could never match.
            ctx.report(
                prefix.span(),
                "`path_prefix` must be ASCII, as request paths are",
                Some("percent-encode it as requests carry it, e.g. `/caf%C3%A9`".to_owned()),
            );
        }
        // Whole segments: "/v2/" means the same as "/v2".
        let trimmed = p.trim_end_matches('/');
        if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        }
    });
    let mut headers = Vec::new();
    for (name, value) in r.headers.iter().flat_map(|h| h.0.iter()) {
        // RFC 9110 token characters, as HTTP allows in a field name.
        let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if name.get_ref().is_empty() || !name.get_ref().bytes().all(tchar) {
            ctx.error(
                name.span(),
                format!("invalid header name `{}`", name.get_ref()),
            );
        }
        if value
            .get_ref()
            .bytes()
            .any(|c| (c.is_ascii_control() && c != b'\t') || c == 0x7f)
        {
            ctx.error(
                value.span(),
                format!(
                    "the value of header `{}` has control characters, which no request carries",
                    name.get_ref()
                ),
            );
        }
        headers.push((name.get_ref().to_ascii_lowercase(), value.get_ref().clone()));
    }
    let mut backends = Vec::new();
    match &r.backends {
        None => ctx.error(route.span(), "a route needs `backends`"),
        Some(backends_raw) => {
            if backends_raw.0.is_empty() {
                ctx.error(route.span(), "`backends` is empty");
            }
            for (backend, weight) in &backends_raw.0 {
                let w = *weight.get_ref();
                let weight_ok = if w < 0 {
                    ctx.error(weight.span(), "route weights must not be negative");
                    false
                } else if w > i64::from(MAX_WEIGHT) {
                    ctx.error(
                        weight.span(),
                        format!("route weights must be at most {MAX_WEIGHT}"),
                    );
                    false
                } else {
                    true
                };
                if !check_reference(ctx, backend, "backends", scope) {
                    continue;
                }
                let name = backend.get_ref();
                let facts = scope.facts.get(name);
                if facts.and_then(|f| f.port) == Some(PortSpec::None) {
                    ctx.error(
                        backend.span(),
                        format!(
                            "service `{name}` has `port = \"none\"` and cannot be a route backend",
                        ),
                    );
                } else if let Some(theirs) = facts.and_then(|f| f.protocol) {
                    if theirs != protocol {
                        ctx.error(
                            backend.span(),
                            format!(
                                "route backend `{name}` speaks {}, but `{service}` speaks {}",
                                protocol_name(theirs),
                                protocol_name(protocol)
                            ),
                        );
                    }
                }
                if weight_ok {
                    backends.push((name.clone(), w as u32));
                }
            }
            let all_zero =
                !backends_raw.0.is_empty() && backends_raw.0.iter().all(|(_, w)| *w.get_ref() == 0);
            if all_zero {
                ctx.error(
                    route.span(),
                    "every weight in `backends` is 0: no request could be routed",
                );
            }
        }
    }
    let timeout = r.timeout.as_ref().and_then(|timeout| {
        let d = duration(ctx, timeout, "routes.timeout")?;
        if d.is_zero() {
            ctx.error(timeout.span(), "`routes.timeout` must be greater than 0s");
        }
        Some(d)
    });
    let fault = r.fault.as_ref().and_then(|fault| check_fault(ctx, fault));
    if ctx.diags.len() > errors_before {
        return None;
    }
    Some(Route {
        path_prefix,
        headers,
        backends,
        timeout,
        fault,
    })
}

/// The largest route weight: weights are relative, so this is precision enough, and
/// sums stay far from overflowing.
const MAX_WEIGHT: u32 = 1_000_000;

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http => "http",
        Protocol::Grpc => "grpc",
        Protocol::Tcp => "tcp",
    }
}

/// `fault = { delay, delay_percent, abort, abort_percent }`. A percent without its
/// `delay` / `abort` is an error; a `delay` / `abort` without its percent applies to
/// every matched request.
fn check_fault(ctx: &mut Ctx<'_>, fault: &Spanned<RawFault>) -> Option<Fault> {
    let f = fault.get_ref();
    let delay = f
        .delay
        .as_ref()
        .and_then(|delay| duration(ctx, delay, "fault.delay"));
    percent(
        ctx,
        f.delay_percent.as_ref().map(|p| (p.span(), *p.get_ref())),
        "fault.delay_percent",
    );
    percent(
        ctx,
        f.abort_percent.as_ref().map(|p| (p.span(), *p.get_ref())),
        "fault.abort_percent",
    );
    let abort = f.abort.as_ref().and_then(|abort| {
        if (200..=599).contains(abort.get_ref()) {
            u16::try_from(*abort.get_ref()).ok()
        } else {
            ctx.error(
                abort.span(),
                "`fault.abort` must be an HTTP status between 200 and 599",
            );
            None
        }
    });
    if let (None, Some(p)) = (&f.delay, &f.delay_percent) {
        ctx.error(p.span(), "`fault.delay_percent` needs `fault.delay`");
    }
    if let (None, Some(p)) = (&f.abort, &f.abort_percent) {
        ctx.error(p.span(), "`fault.abort_percent` needs `fault.abort`");
    }
    if f.delay.is_none()
        && f.abort.is_none()
        && f.delay_percent.is_none()
        && f.abort_percent.is_none()
    {
        ctx.error(fault.span(), "`fault` needs `delay` or `abort`");
    }
    let pct = |p: &Option<Spanned<f64>>| p.as_ref().map_or(100.0, |p| *p.get_ref());
    Some(Fault {
        delay,
        delay_percent: pct(&f.delay_percent),
        abort,
        abort_percent: pct(&f.abort_percent),
    })
}
