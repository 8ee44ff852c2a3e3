//! Serde types for the whole of `mesh.toml` (SPEC §3), as written by the user.
//!
//! Only `config` sees these. Every field is optional here, even the ones the model
//! requires: a missing `command` or a field dropped because of a type error is reported by
//! `validate` with a position, which serde's "missing field" error could not give.
//!
//! Enumerations (`protocol`, `restart`, conditions, …) and durations stay strings here so
//! that `validate` can say what was expected and suggest the closest spelling. Values that
//! semantic checks point at are wrapped in [`Spanned`].
//!
//! [`FILE`] is the key schema of the same types, used to report every unknown key at once
//! before serde runs (serde stops at the first). A test keeps it in step with the structs.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use toml::Spanned;

/// `[mesh]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMesh {
    pub(crate) name: Option<Spanned<String>>,
    pub(crate) state_dir: Option<Spanned<String>>,
    pub(crate) admin: Option<Spanned<String>>,
    pub(crate) tls: Option<Spanned<String>>,
    pub(crate) shutdown_timeout: Option<Spanned<DurationStr>>,
    pub(crate) ca: Option<Spanned<RawCa>>,
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) etcd: Option<Spanned<RawEtcd>>,
    /// `"in-process"` or `"tls"` (SPEC §1 "The local path").
    pub(crate) local_path: Option<Spanned<String>>,
    /// `"off"`, `"stdout"` or a path (SPEC §5).
    pub(crate) access_log: Option<Spanned<String>>,
    /// Seed for the random draws of routes (weighted backends, faults), so that test
    /// runs can be reproduced.
    pub(crate) seed: Option<Spanned<i64>>,
}

/// `[mesh] ca = { cert, key }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCa {
    pub(crate) cert: Option<Spanned<String>>,
    pub(crate) key: Option<Spanned<String>>,
}

/// `[mesh] etcd = { endpoints, prefix, lease_ttl }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEtcd {
    pub(crate) endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) prefix: Option<Spanned<String>>,
    pub(crate) lease_ttl: Option<Spanned<DurationStr>>,
}

/// `[services.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub(crate) command: Option<Spanned<RawCommand>>,
    pub(crate) working_dir: Option<Spanned<String>>,
    pub(crate) env: Option<OrderedMap<Spanned<String>, Spanned<EnvValue>>>,
    pub(crate) env_file: Option<Spanned<String>>,
    pub(crate) user: Option<Spanned<String>>,
    pub(crate) group: Option<Spanned<String>>,
    pub(crate) replicas: Option<Spanned<i64>>,
    pub(crate) protocol: Option<Spanned<String>>,
    pub(crate) port: Option<Spanned<RawPort>>,
    pub(crate) expose: Option<Spanned<RawExpose>>,
    pub(crate) upstreams: Option<Vec<Spanned<String>>>,
    pub(crate) depends_on: Option<RawDependsOn>,
    pub(crate) restart: Option<Spanned<String>>,
    pub(crate) backoff: Option<RawBackoff>,
    pub(crate) start_limit: Option<RawStartLimit>,
    pub(crate) stop_signal: Option<Spanned<String>>,
    pub(crate) stop_timeout: Option<Spanned<DurationStr>>,
    pub(crate) watch: Option<Vec<Spanned<String>>>,
    pub(crate) ready_timeout: Option<Spanned<DurationStr>>,
    pub(crate) allow: Option<Vec<Spanned<String>>>,
    pub(crate) health: Option<Spanned<RawHealth>>,
    pub(crate) traffic: Option<RawTraffic>,
    pub(crate) routes: Option<Vec<Spanned<RawRoute>>>,
}

/// `command` or `health.exec`: one string split like a shell, or an array of words.
#[derive(Debug)]
pub(crate) enum RawCommand {
    Line(String),
    Words(Vec<Spanned<String>>),
}

/// `port`: a number, or `"none"`. Kept as `i64` so `validate` reports the range itself.
#[derive(Debug)]
pub(crate) enum RawPort {
    Number(i64),
    None,
}

/// `expose`: a port on 127.0.0.1, or `"ADDR:PORT"`.
#[derive(Debug)]
pub(crate) enum RawExpose {
    Port(i64),
    Addr(String),
}

/// `depends_on`: `{ name = "condition" }`, or `["name"]` meaning `"started"`.
#[derive(Debug)]
pub(crate) enum RawDependsOn {
    Table(Vec<(Spanned<String>, Spanned<String>)>),
    List(Vec<Spanned<String>>),
}

/// A duration as written (`"10s"`); `validate` parses it, so that a bad spelling gets a
/// message about durations rather than serde's.
#[derive(Debug)]
pub(crate) struct DurationStr(pub(crate) String);

/// An `env` value. Numbers and booleans are accepted and kept as written, as in compose.
#[derive(Debug)]
pub(crate) struct EnvValue(pub(crate) String);

/// A TOML table as a list of entries in file order (`toml` is built with
/// `preserve_order`), for tables whose keys are names chosen by the user.
#[derive(Debug)]
pub(crate) struct OrderedMap<K, V>(pub(crate) Vec<(K, V)>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackoff {
    pub(crate) initial: Option<Spanned<DurationStr>>,
    pub(crate) max: Option<Spanned<DurationStr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStartLimit {
    pub(crate) burst: Option<Spanned<i64>>,
    pub(crate) interval: Option<Spanned<DurationStr>>,
}

/// `[services.NAME.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub(crate) http: Option<Spanned<String>>,
    pub(crate) tcp: Option<Spanned<bool>>,
    pub(crate) exec: Option<Spanned<RawCommand>>,
    pub(crate) interval: Option<Spanned<DurationStr>>,
    pub(crate) timeout: Option<Spanned<DurationStr>>,
    pub(crate) failures: Option<Spanned<i64>>,
    pub(crate) start_period: Option<Spanned<DurationStr>>,
    pub(crate) restart_on_unhealthy: Option<bool>,
}

/// `[services.NAME.traffic]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTraffic {
    pub(crate) timeout: Option<Spanned<DurationStr>>,
    pub(crate) load_balancer: Option<Spanned<String>>,
    pub(crate) retries: Option<RawRetries>,
    pub(crate) circuit_breaker: Option<RawCircuitBreaker>,
    pub(crate) rate_limit: Option<Spanned<RawRateLimit>>,
    pub(crate) max_concurrent: Option<Spanned<i64>>,
    pub(crate) queue_timeout: Option<Spanned<DurationStr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetries {
    pub(crate) attempts: Option<Spanned<i64>>,
    pub(crate) per_try_timeout: Option<Spanned<DurationStr>>,
    pub(crate) on: Option<Vec<Spanned<String>>>,
    pub(crate) budget: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCircuitBreaker {
    pub(crate) consecutive_failures: Option<Spanned<i64>>,
    pub(crate) base_ejection: Option<Spanned<DurationStr>>,
    pub(crate) max_ejection: Option<Spanned<DurationStr>>,
    pub(crate) max_ejected_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) rps: Option<Spanned<f64>>,
    pub(crate) burst: Option<Spanned<i64>>,
}

/// One `[[services.NAME.routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) path_prefix: Option<Spanned<String>>,
    pub(crate) headers: Option<OrderedMap<Spanned<String>, Spanned<String>>>,
    pub(crate) backends: Option<OrderedMap<Spanned<String>, Spanned<i64>>>,
    pub(crate) timeout: Option<Spanned<DurationStr>>,
    pub(crate) fault: Option<Spanned<RawFault>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFault {
    pub(crate) delay: Option<Spanned<DurationStr>>,
    pub(crate) delay_percent: Option<Spanned<f64>>,
    pub(crate) abort: Option<Spanned<i64>>,
    pub(crate) abort_percent: Option<Spanned<f64>>,
}

// === key schema ===

/// One key of a table in the schema.
#[derive(Debug)]
pub(crate) struct Field {
    pub(crate) name: &'static str,
    pub(crate) shape: Shape,
    /// `false` for keys whose feature is not built yet: they are parsed and checked in
    /// full, then rejected with "not supported yet". Flipping this is what enables one.
    pub(crate) supported: bool,
}

/// What a value must look like, as far as the unknown-key walk cares.
#[derive(Debug)]
pub(crate) enum Shape {
    /// Anything; serde checks the type.
    Leaf,
    /// A table with exactly these keys.
    Table(&'static [Field]),
    /// A table whose keys are names chosen by the user (`services`).
    MapOf(&'static Shape),
    /// An array whose elements look like this (`routes`).
    ArrayOf(&'static Shape),
}

const fn key(name: &'static str) -> Field {
    Field {
        name,
        shape: Shape::Leaf,
        supported: true,
    }
}

const fn table(name: &'static str, fields: &'static [Field]) -> Field {
    Field {
        name,
        shape: Shape::Table(fields),
        supported: true,
    }
}

/// Marks a key as not supported yet (see [`Field::supported`]).
#[allow(
    dead_code,
    reason = "every key is supported today; kept for the next feature built in steps"
)]
const fn not_yet(field: Field) -> Field {
    Field {
        supported: false,
        ..field
    }
}

/// The top level of `mesh.toml`.
pub(crate) const FILE: &[Field] = &[
    key("version"),
    table("mesh", MESH),
    Field {
        name: "services",
        shape: Shape::MapOf(&Shape::Table(SERVICE)),
        supported: true,
    },
];

// Flip points: a `not_yet` here is removed by the change that builds that feature
// (`listen` and `etcd` were flipped by multi-host, SPEC §9).
pub(crate) const MESH: &[Field] = &[
    key("name"),
    key("state_dir"),
    key("admin"),
    key("tls"),
    key("shutdown_timeout"),
    table("ca", CA),
    key("listen"),
    table("etcd", ETCD),
    key("local_path"),
    key("access_log"),
    key("seed"),
];

pub(crate) const CA: &[Field] = &[key("cert"), key("key")];

pub(crate) const ETCD: &[Field] = &[key("endpoints"), key("prefix"), key("lease_ttl")];

pub(crate) const SERVICE: &[Field] = &[
    key("command"),
    key("working_dir"),
    key("env"),
    key("env_file"),
    key("user"),
    key("group"),
    key("replicas"),
    key("protocol"),
    key("port"),
    key("expose"),
    key("upstreams"),
    key("depends_on"),
    key("restart"),
    table("backoff", BACKOFF),
    table("start_limit", START_LIMIT),
    key("stop_signal"),
    key("stop_timeout"),
    key("watch"),
    key("ready_timeout"),
    key("allow"),
    table("health", HEALTH),
    table("traffic", TRAFFIC),
    Field {
        name: "routes",
        shape: Shape::ArrayOf(&Shape::Table(ROUTE)),
        supported: true,
    },
];

pub(crate) const BACKOFF: &[Field] = &[key("initial"), key("max")];

pub(crate) const START_LIMIT: &[Field] = &[key("burst"), key("interval")];

pub(crate) const HEALTH: &[Field] = &[
    key("http"),
    key("tcp"),
    key("exec"),
    key("interval"),
    key("timeout"),
    key("failures"),
    key("start_period"),
    key("restart_on_unhealthy"),
];

pub(crate) const TRAFFIC: &[Field] = &[
    key("timeout"),
    key("load_balancer"),
    table("retries", RETRIES),
    table("circuit_breaker", CIRCUIT_BREAKER),
    table("rate_limit", RATE_LIMIT),
    key("max_concurrent"),
    key("queue_timeout"),
];

pub(crate) const RETRIES: &[Field] = &[
    key("attempts"),
    key("per_try_timeout"),
    key("on"),
    key("budget"),
];

pub(crate) const CIRCUIT_BREAKER: &[Field] = &[
    key("consecutive_failures"),
    key("base_ejection"),
    key("max_ejection"),
    key("max_ejected_percent"),
];

pub(crate) const RATE_LIMIT: &[Field] = &[key("rps"), key("burst")];

pub(crate) const ROUTE: &[Field] = &[
    key("path_prefix"),
    key("headers"),
    key("backends"),
    key("timeout"),
    table("fault", FAULT),
];

pub(crate) const FAULT: &[Field] = &[
    key("delay"),
    key("delay_percent"),
    key("abort"),
    key("abort_percent"),
];

// === impl Deserialize ===

impl<'de> Deserialize<'de> for RawCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawCommand;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCommand, E> {
                Ok(RawCommand::Line(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawCommand, A::Error> {
                let mut words = Vec::new();
                while let Some(word) = seq.next_element()? {
                    words.push(word);
                }
                Ok(RawCommand::Words(words))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or \"none\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPort, E> {
                // Too big for i64 is out of range anyway; saturate so the range check says so.
                Ok(RawPort::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPort, E> {
                if v == "none" {
                    Ok(RawPort::None)
                } else {
                    Err(E::invalid_value(Unexpected::Str(v), &self))
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawExpose {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawExpose;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or \"ADDR:PORT\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawExpose, E> {
                Ok(RawExpose::Port(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawExpose, E> {
                Ok(RawExpose::Port(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawExpose, E> {
                Ok(RawExpose::Addr(v.to_owned()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawDependsOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawDependsOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of service = condition or an array of service names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawDependsOn, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element()? {
                    names.push(name);
                }
                Ok(RawDependsOn::List(names))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDependsOn, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawDependsOn::Table(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"10s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationStr, E> {
                Ok(DurationStr(v.to_owned()))
            }
        }
        deserializer.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis<K, V>(PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for Vis<K, V> {
            type Value = OrderedMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(Vis(PhantomData))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    /// A deserializer that only records the field list serde derives for a struct, so
    /// the schema can be compared with the structs.
    struct FieldsOf;

    #[derive(Debug)]
    struct Captured(Option<&'static [&'static str]>);

    impl fmt::Display for Captured {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl std::error::Error for Captured {}

    impl de::Error for Captured {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Captured(None)
        }
    }

    impl<'de> Deserializer<'de> for FieldsOf {
        type Error = Captured;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
            Err(Captured(None))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Captured> {
            Err(Captured(Some(fields)))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        match T::deserialize(FieldsOf) {
            Err(Captured(Some(fields))) => fields.to_vec(),
            _ => panic!("not a struct"),
        }
    }

    fn names(schema: &[Field]) -> Vec<&'static str> {
        schema.iter().map(|f| f.name).collect()
    }

    #[test]
    fn schema_matches_structs() {
        assert_eq!(names(MESH), fields_of::<RawMesh>());
        assert_eq!(names(CA), fields_of::<RawCa>());
        assert_eq!(names(ETCD), fields_of::<RawEtcd>());
        assert_eq!(names(SERVICE), fields_of::<RawService>());
        assert_eq!(names(BACKOFF), fields_of::<RawBackoff>());
        assert_eq!(names(START_LIMIT), fields_of::<RawStartLimit>());
        assert_eq!(names(HEALTH), fields_of::<RawHealth>());
        assert_eq!(names(TRAFFIC), fields_of::<RawTraffic>());
        assert_eq!(names(RETRIES), fields_of::<RawRetries>());
        assert_eq!(names(CIRCUIT_BREAKER), fields_of::<RawCircuitBreaker>());
        assert_eq!(names(RATE_LIMIT), fields_of::<RawRateLimit>());
        assert_eq!(names(ROUTE), fields_of::<RawRoute>());
        assert_eq!(names(FAULT), fields_of::<RawFault>());
    }

    #[test]
    fn full_example_deserializes() {
        let text = r#"
command = ["python3", "web.py"]
working_dir = "examples/quickstart"
env = { GREETING = "hello", N = 3 }
env_file = ".env"
user = "www-data"
group = "www-data"
replicas = 1
protocol = "http"
port = "none"
expose = "0.0.0.0:8080"
upstreams = ["api"]
depends_on = ["api"]
restart = "on-failure"
backoff = { initial = "100ms", max = "30s" }
start_limit = { burst = 5, interval = "60s" }
stop_signal = "SIGTERM"
stop_timeout = "10s"
watch = ["**/*.py"]
ready_timeout = "60s"
allow = ["admin"]
health = { exec = "true", interval = "2s", timeout = "1s", failures = 3, start_period = "0s", restart_on_unhealthy = false }
traffic = { timeout = "10s", load_balancer = "p2c-ewma", retries = { attempts = 3, per_try_timeout = "2s", on = ["gateway-error"], budget = 0.2 }, circuit_breaker = { consecutive_failures = 5, base_ejection = "1s", max_ejection = "60s", max_ejected_percent = 50 }, rate_limit = { rps = 200, burst = 400 }, max_concurrent = 1024, queue_timeout = "3s" }
routes = [{ path_prefix = "/v2", headers = { x-canary = "1" }, backends = { api-v2 = 90, api = 10 }, timeout = "2s", fault = { delay = "100ms", delay_percent = 10, abort = 503, abort_percent = 1 } }]
"#;
        let service: RawService = toml::from_str(text).expect("deserializes");
        assert!(matches!(
            service.port.map(Spanned::into_inner),
            Some(RawPort::None)
        ));
        let env = service.env.expect("env");
        assert_eq!(env.0[0].0.get_ref(), "GREETING");
        assert_eq!(env.0[1].1.get_ref().0, "3");
        assert!(matches!(service.depends_on, Some(RawDependsOn::List(_))));
        assert_eq!(service.routes.expect("routes").len(), 1);
    }
}
