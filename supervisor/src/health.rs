//! Readiness and liveness checks.
