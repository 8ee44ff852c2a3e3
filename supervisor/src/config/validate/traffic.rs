//! Checks of `traffic` and `routes`. The parts not built yet (`rate_limit`, `routes`) are
//! rejected as "not supported yet" by the key walk; their values are checked in full
//! anyway, so that enabling them is only a flip.

// The parent's types and helpers are this module's vocabulary.
use super::*;
use crate::config::model::{CircuitBreaker, LoadBalancer, Retries, RetryOn, Traffic};
use crate::config::raw::{RawCircuitBreaker, RawRetries};

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
        if let Some(rps) = &rl.rps {
            if !(rps.get_ref().is_finite() && *rps.get_ref() > 0.0) {
                ctx.error(
                    rps.span(),
                    "`traffic.rate_limit.rps` must be greater than 0",
                );
            }
        }
        at_least(ctx, rl.burst.as_ref(), 1, "traffic.rate_limit.burst");
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

pub(super) fn check_route(
    ctx: &mut Ctx<'_>,
    route: &Spanned<RawRoute>,
    protocol: Protocol,
    scope: &Scope<'_>,
) {
    let r = route.get_ref();
    if protocol == Protocol::Tcp
        && (r.path_prefix.is_some()
            || r.headers.is_some()
            || r.timeout.is_some()
            || r.fault.is_some())
    {
        ctx.error(
            route.span(),
            "routes of a tcp service may only set `backends`",
        );
    }
    if let Some(prefix) = &r.path_prefix {
        if !prefix.get_ref().starts_with('/') {
            ctx.error(prefix.span(), "`path_prefix` must start with `/`");
        }
    }
    for (name, _) in r.headers.iter().flat_map(|h| h.0.iter()) {
        if name.get_ref().is_empty()
            || !name
                .get_ref()
                .bytes()
                .all(|c| c.is_ascii_graphic() && c != b':')
        {
            ctx.error(
                name.span(),
                format!("invalid header name `{}`", name.get_ref()),
            );
        }
    }
    match &r.backends {
        None => ctx.error(route.span(), "a route needs `backends`"),
        Some(backends) => {
            if backends.0.is_empty() {
                ctx.error(route.span(), "`backends` is empty");
            }
            for (backend, weight) in &backends.0 {
                if *weight.get_ref() < 0 {
                    ctx.error(weight.span(), "route weights must not be negative");
                }
                if !check_reference(ctx, backend, "backends", scope) {
                    continue;
                }
                if scope.facts.get(backend.get_ref()).and_then(|f| f.port) == Some(PortSpec::None) {
                    ctx.error(
                        backend.span(),
                        format!(
                            "service `{}` has `port = \"none\"` and cannot be a route backend",
                            backend.get_ref()
                        ),
                    );
                }
            }
        }
    }
    if let Some(timeout) = &r.timeout {
        duration(ctx, timeout, "routes.timeout");
    }
    if let Some(fault) = &r.fault {
        if let Some(delay) = &fault.delay {
            duration(ctx, delay, "fault.delay");
        }
        percent(
            ctx,
            fault
                .delay_percent
                .as_ref()
                .map(|p| (p.span(), *p.get_ref())),
            "fault.delay_percent",
        );
        percent(
            ctx,
            fault
                .abort_percent
                .as_ref()
                .map(|p| (p.span(), *p.get_ref())),
            "fault.abort_percent",
        );
        if let Some(abort) = &fault.abort {
            if !(200..=599).contains(abort.get_ref()) {
                ctx.error(
                    abort.span(),
                    "`fault.abort` must be an HTTP status between 200 and 599",
                );
            }
        }
    }
}
