//! Command-line and environment configuration.
//!
//! Every flag can also be set by an environment variable `FENCEGATE_<FLAG>`
//! (dashes become underscores), which is how the Helm chart configures pods.
//! Durations take humantime syntax: `500ms`, `10s`, `2m`, at most `10y`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use clap::Args;

use crate::filter::admission::BarrierConfig;
use crate::filter::{FilterConfig, Protection};
use crate::lease::sequencer::{EtcdSequencer, HolderCheck};
use crate::proxy::ServerLimits;
use crate::token::{LockName, ReadMethods, Token};

/// Kept here too: flags and other code name it `config::duration`.
pub use crate::duration::parse as duration;

/// Limits shared by every server.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// How long a client may take to send a request head: a connection with no request in flight for this long is
    /// closed, bytes or not (a head sent a byte at a time; idle keep-alive and h2c connections too). Takes effect
    /// between this and a quarter more. The filter with --store s3 also reads the start of some bodies (DeleteObjects,
    /// a POST-policy form) within it, else 408 body_timeout.
    #[arg(long, env = "FENCEGATE_HEADER_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_timeout: Duration,
    /// Largest request head accepted, in bytes.
    #[arg(long, env = "FENCEGATE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// On SIGTERM, how long in-flight requests get to finish.
    #[arg(long, env = "FENCEGATE_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Connect timeout to the upstream.
    #[arg(long, env = "FENCEGATE_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response head; at the filter, also the longest a write's answer, once
    /// begun, may send nothing (the write holds its lock until its answer ends).
    #[arg(long, env = "FENCEGATE_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub upstream_timeout: Duration,
    /// Close a connection with no request in flight and no bytes either way for this long (HTTP/1 and h2c).
    #[arg(long, env = "FENCEGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Close a connection whose client has taken no byte of what is sent to it (its socket full) for this long, request
    /// in flight or not (nginx's send_timeout). A frozen client otherwise holds its answer, and the filter holds a
    /// write until its answer ends: a newer holder's writes would wait for ever. 0s: none.
    #[arg(long, env = "FENCEGATE_SEND_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub send_timeout: Duration,
    /// Most client connections open at once per server; above it, stop accepting until one closes.
    #[arg(long, env = "FENCEGATE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

impl LimitArgs {
    pub fn server(&self) -> ServerLimits {
        ServerLimits {
            header_read_timeout: self.header_timeout,
            max_header_bytes: self.max_header_bytes,
            shutdown_grace: self.shutdown_grace,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            max_connections: self.max_connections as usize,
        }
    }
}

/// `fencegate filter [set-mark]`: run the filter, or repair its state.
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct FilterCmd {
    #[command(subcommand)]
    pub action: Option<FilterAction>,
    // Not an `Option`: clap fills it (defaults) even for `set-mark`, so the
    // flags it requires are `Option`s marked `required` (which a subcommand
    // negates) and checked again in `FilterArgs::config`.
    #[command(flatten)]
    pub run: FilterArgs,
}

/// What `fencegate filter` can do besides running.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum FilterAction {
    /// Set a lock's durable high-water mark by hand (e.g. lower one a forged token raised); refuses while a filter
    /// runs on the state directory.
    SetMark(SetMarkArgs),
}

/// `fencegate filter set-mark`.
#[derive(Args, Debug, Clone)]
pub struct SetMarkArgs {
    /// The filter's state directory.
    #[arg(long, env = "FENCEGATE_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The lock whose mark to set.
    #[arg(long, env = "FENCEGATE_LOCK")]
    pub lock: LockName,
    /// The new mark (1..=9223372036854775807): the highest token a genuine holder has used.
    #[arg(long, env = "FENCEGATE_TOKEN")]
    pub token: Token,
}

/// `fencegate filter`: refuse stale writes in front of a store.
#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Address the proxy listens on.
    #[arg(long, env = "FENCEGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The store, e.g. http://store:80 (a path prefix is kept).
    #[arg(long, env = "FENCEGATE_UPSTREAM", required = true)]
    pub upstream: Option<String>,
    /// Send this Host to the store instead of the client's (default: the client's, which S3 clients sign).
    #[arg(long, env = "FENCEGATE_UPSTREAM_HOST")]
    pub upstream_host: Option<String>,
    /// Directory for the durable high-water marks (one filter per directory).
    #[arg(long, env = "FENCEGATE_STATE_DIR", required = true)]
    pub state_dir: Option<PathBuf>,
    /// Protect every path with this lock.
    #[arg(long, env = "FENCEGATE_LOCK", conflicts_with = "protect")]
    pub lock: Option<LockName>,
    /// Protect paths starting with PATH_PREFIX with LOCK (repeatable; longest prefix wins).
    #[arg(long, env = "FENCEGATE_PROTECT", value_name = "PATH_PREFIX=LOCK", value_delimiter = ',')]
    pub protect: Vec<String>,
    /// Read more PATH_PREFIX=LOCK rules from a file, one per line (# comments, blank lines ignored).
    #[arg(long, env = "FENCEGATE_PROTECT_FILE", conflicts_with = "lock")]
    pub protect_file: Option<PathBuf>,
    /// Forward writes to paths no rule covers, unfenced (default: refuse with 403).
    #[arg(long, env = "FENCEGATE_ALLOW_UNPROTECTED")]
    pub allow_unprotected: bool,
    /// Check tokens on reads too.
    #[arg(long, env = "FENCEGATE_FENCE_READS")]
    pub fence_reads: bool,
    /// Methods that are reads (everything else is a write).
    #[arg(long, env = "FENCEGATE_READ_METHODS", default_value = "GET,HEAD,OPTIONS,TRACE,PROPFIND")]
    pub read_methods: String,
    /// Admin address: /healthz, /readyz, /metrics, /v1/locks, POST /v1/locks/{lock}/fence.
    #[arg(long, env = "FENCEGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// How long older in-flight writes get to finish when a newer token arrives.
    #[arg(long, env = "FENCEGATE_DRAIN_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// After aborting older writes, how long the barrier still holds.
    #[arg(long, env = "FENCEGATE_ABORT_GRACE", default_value = "1s", value_parser = duration)]
    pub abort_grace: Duration,
    /// Longest a write waits at the barrier before 503 + Retry-After.
    #[arg(long, env = "FENCEGATE_MAX_WAIT", default_value = "10s", value_parser = duration)]
    pub max_wait: Duration,
    /// Above this many locks, /metrics reports totals (lock="*") instead of one series per lock.
    #[arg(long, env = "FENCEGATE_METRICS_LOCK_LIMIT", default_value_t = 1000)]
    pub metrics_lock_limit: usize,
    /// Accept `;` path parameters in protected paths (rules then match with them cut, as servlet stores read them).
    #[arg(long, env = "FENCEGATE_ALLOW_PATH_PARAMS")]
    pub allow_path_params: bool,
    /// With --etcd: a token above a lock's highest is admitted only if etcd shows it is the current holder's (403
    /// fencing_token_unverified otherwise). Without --etcd, tokens are trusted as sent.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// etcd key prefix of the lock queues (the sidecars' --key-prefix).
    #[arg(long, env = "FENCEGATE_KEY_PREFIX", default_value = "/fencegate/locks")]
    pub key_prefix: String,
    /// With --etcd, do not verify raises: trust tokens as sent (for tokens from a lock service other than fencegate's
    /// sidecars, when --etcd is only there for --shared-marks). Logged as a warning at start.
    #[arg(long, env = "FENCEGATE_TRUST_TOKENS")]
    pub trust_tokens: bool,
    /// What kind of store is behind the filter: `plain` (a write changes its path and Destination) or `s3`
    /// (bucket-level requests, DeleteObjects keys, POST-policy keys, virtual-hosted buckets; see README "Stores").
    #[arg(long, env = "FENCEGATE_STORE", value_enum, default_value = "plain")]
    pub store: crate::filter::Store,
    /// With --store s3: requests with `Host: BUCKET.DOMAIN` (virtual-hosted style) are matched as /BUCKET/...;
    /// it must be the domain the store itself takes virtual-hosted names for. Not with --upstream-host (the store
    /// would read the path as another bucket), nor with an --upstream under the domain. A Host the store might
    /// read otherwise (upper case, trailing dot, repeated, a port cut another way; a differing
    /// X-Forwarded-Host): 400 host_malformed. In lower case, without a leading or trailing dot.
    #[arg(long, env = "FENCEGATE_S3_DOMAIN")]
    pub s3_domain: Option<String>,
    /// TESTS ONLY: switch the epoch barrier off, to show what it prevents.
    #[cfg(feature = "test-unsafe")]
    #[arg(long, hide = true, env = "FENCEGATE_UNSAFE_NO_BARRIER")]
    pub unsafe_no_barrier: bool,
    /// TESTS ONLY: match rules on the raw request path and ignore Destination, to show what decoding prevents.
    #[cfg(feature = "test-unsafe")]
    #[arg(long, hide = true, env = "FENCEGATE_UNSAFE_RAW_PATHS")]
    pub unsafe_raw_paths: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub shared: SharedMarksArgs,
}

/// `fencegate filter --shared-marks` (issue 15): the replica's side of the
/// marks shared through etcd; the connection is the filter's `--etcd`.
#[derive(Args, Debug, Clone)]
pub struct SharedMarksArgs {
    /// Share every lock's high-water mark with the other filter replicas through etcd (needs --etcd; --state-dir is
    /// then unused).
    #[arg(long, env = "FENCEGATE_SHARED_MARKS")]
    pub shared_marks: bool,
    /// This replica's name, unique among the replicas (default: $HOSTNAME, the pod name).
    #[arg(long, env = "FENCEGATE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// TTL of this replica's etcd registration; it stops forwarding writes, and cuts off those in flight, --abort-grace
    /// plus a tenth of the TTL before it can expire (so at least 2.5 x --abort-grace, whole seconds).
    #[arg(long, env = "FENCEGATE_REPLICA_TTL", default_value = "10s", value_parser = duration)]
    pub replica_ttl: Duration,
    /// etcd key prefix of the shared marks, registrations and acknowledgements.
    #[arg(long, env = "FENCEGATE_MARKS_PREFIX", default_value = "/fencegate/filter")]
    pub marks_prefix: String,
    /// TESTS ONLY: leave a self-fenced replica's writes in flight running, to show what cutting them off prevents.
    #[cfg(feature = "test-unsafe")]
    #[arg(long, hide = true, env = "FENCEGATE_UNSAFE_NO_REPLICA_CUT_OFF")]
    pub unsafe_no_replica_cut_off: bool,
    /// TESTS ONLY: go on when etcd lost marks a replica saw (restored from a snapshot), to show what failing closed
    /// prevents.
    #[cfg(feature = "test-unsafe")]
    #[arg(long, hide = true, env = "FENCEGATE_UNSAFE_NO_ROLLBACK_CHECK")]
    pub unsafe_no_rollback_check: bool,
}

impl SharedMarksArgs {
    /// The shared-marks configuration, or `None` without `--shared-marks`.
    ///
    /// The replica's self-fencing margin is the sidecar's plus
    /// `abort_grace`: at the deadline the replica cuts off its writes in
    /// flight, and the store may apply such a write up to `abort_grace`
    /// later, which must still fall before etcd can expire the registration
    /// and let the other replicas stop waiting for this one.
    pub fn shared(
        &self,
        etcd: &EtcdArgs,
        raise_timeout: Duration,
        abort_grace: Duration,
    ) -> Result<Option<crate::filter::shared::SharedConfig>, String> {
        if !self.shared_marks {
            return Ok(None);
        }
        if etcd.endpoints.is_empty() {
            return Err("--shared-marks needs --etcd".into());
        }
        let replica_id = match &self.replica_id {
            Some(id) => id.clone(),
            None => std::env::var("HOSTNAME").map_err(|_| "give --replica-id (no $HOSTNAME to default to)")?,
        };
        if !crate::filter::shared::keys::valid_replica_id(&replica_id) {
            return Err(format!("--replica-id {replica_id:?}: use letters, digits, '.', '_' and '-'"));
        }
        if self.replica_ttl < Duration::from_secs(2) {
            return Err("--replica-ttl must be at least 2s (etcd leases count whole seconds)".into());
        }
        let margin = crate::lease::keeper::default_margin(self.replica_ttl) + abort_grace;
        // etcd grants whole seconds. Writable for at least half of it after
        // each acknowledged keep-alive (they are sent every third of it), so
        // a keep-alive answered up to a sixth of the TTL late does not
        // self-fence the replica.
        let granted = Duration::from_secs(self.replica_ttl.as_secs());
        if margin > granted / 2 {
            // The margin is a tenth of the TTL (from 2 s on) plus the grace.
            let least = (abort_grace.as_secs_f64() * 2.5).ceil().max(2.0);
            return Err(format!(
                "--replica-ttl {:?} is too short for --abort-grace {abort_grace:?}: a replica stops writing \
                 --abort-grace plus a tenth of its TTL before its registration can expire, and needs half the TTL \
                 (in whole seconds, as etcd grants it) to write in; give --replica-ttl {least}s or more",
                self.replica_ttl,
            ));
        }
        Ok(Some(crate::filter::shared::SharedConfig {
            etcd: etcd.options()?,
            replica_id,
            ttl: self.replica_ttl,
            margin,
            prefix: self.marks_prefix.clone(),
            raise_timeout,
            #[cfg(feature = "test-unsafe")]
            unsafe_no_cut_off: self.unsafe_no_replica_cut_off,
            #[cfg(not(feature = "test-unsafe"))]
            unsafe_no_cut_off: false,
            #[cfg(feature = "test-unsafe")]
            unsafe_no_rollback_check: self.unsafe_no_rollback_check,
            #[cfg(not(feature = "test-unsafe"))]
            unsafe_no_rollback_check: false,
        }))
    }
}

impl FilterArgs {
    /// The lock queues (`--key-prefix`) and the shared marks
    /// (`--marks-prefix`) must not nest: a mark or a registration inside a
    /// lock's queue would read as a candidate for the lock (its revision
    /// verified as the holder's token), and a queue inside the marks as marks.
    fn prefixes_apart(&self) -> Result<(), String> {
        let dir = |p: &str| format!("{}/", p.trim_end_matches('/'));
        let (keys, marks) = (dir(&self.key_prefix), dir(&self.shared.marks_prefix));
        if keys.starts_with(&marks) || marks.starts_with(&keys) {
            return Err(format!(
                "--key-prefix {:?} and --marks-prefix {:?} nest: give them apart (the defaults are /fencegate/locks \
                 and /fencegate/filter)",
                self.key_prefix, self.shared.marks_prefix
            ));
        }
        Ok(())
    }

    pub fn config(&self) -> Result<FilterConfig, String> {
        let mut rules = self.protect.clone();
        if let Some(f) = &self.protect_file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("--protect-file {}: {e}", f.display()))?;
            rules
                .extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        let protection = match (&self.lock, rules.is_empty()) {
            (Some(l), true) => Protection::all(l.clone()),
            (None, false) => Protection::parse_rules(rules.iter().map(String::as_str))?,
            (None, true) => return Err("give --lock NAME or at least one --protect PATH_PREFIX=LOCK".into()),
            (Some(_), false) => return Err("--lock and --protect/--protect-file exclude each other".into()),
        };
        if self.s3_domain.is_some() && self.store != crate::filter::Store::S3 {
            return Err("--s3-domain needs --store s3".into());
        }
        // The filter would match a virtual-hosted request by the client's
        // `Host` (`bucket.domain`) and the store, sent `--upstream-host`
        // instead, would read its path as another bucket: another lock's.
        if self.s3_domain.is_some() && self.upstream_host.is_some() {
            return Err("--s3-domain and --upstream-host exclude each other: the store would not see the bucket the \
                        filter matched in the client's Host"
                .into());
        }
        let upstream = self.upstream.clone().ok_or("--upstream is required")?;
        // A request with no `Host` and no authority (HTTP/1.0) is matched
        // path-style and sent with the upstream's own name as `Host`: a store
        // addressed as `bucket.DOMAIN` would read it virtual-hosted instead.
        if let Some(domain) = &self.s3_domain {
            // Matched byte for byte against the lower-case Host (see
            // filter::s3): a domain in another spelling would match nothing.
            let label =
                |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !domain.split('.').all(label) {
                return Err(format!(
                    "--s3-domain {domain:?} is not a domain name in lower case (labels of a-z, 0-9 and -, no \
                     leading or trailing dot)"
                ));
            }
            let host = upstream.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_ascii_lowercase));
            let domain = domain.trim_matches('.').to_ascii_lowercase();
            if host.is_some_and(|h| h.trim_end_matches('.').ends_with(&format!(".{domain}"))) {
                return Err(format!(
                    "--upstream {upstream} is a virtual-hosted name under --s3-domain {domain}: address the store by a \
                     name outside the domain, so that a request without a Host is read path-style by both"
                ));
            }
        }
        Ok(FilterConfig {
            upstream,
            upstream_host: self.upstream_host.clone(),
            state_dir: self.state_dir.clone().ok_or("--state-dir is required")?,
            protection,
            allow_unprotected: self.allow_unprotected,
            allow_path_params: self.allow_path_params,
            store: self.store,
            s3_domain: self.s3_domain.clone(),
            #[cfg(feature = "test-unsafe")]
            unsafe_raw_paths: self.unsafe_raw_paths,
            #[cfg(not(feature = "test-unsafe"))]
            unsafe_raw_paths: false,
            // In-process tests only (`tests/in_process.rs`): no flag.
            unsafe_release_at_head: false,
            unsafe_abort_sent: false,
            unsafe_drop_orphans: false,
            fence_reads: self.fence_reads,
            read_methods: ReadMethods::parse(&self.read_methods)?,
            barrier: BarrierConfig {
                drain_timeout: self.drain_timeout,
                abort_grace: self.abort_grace,
                #[cfg(feature = "test-unsafe")]
                disabled: self.unsafe_no_barrier,
                #[cfg(not(feature = "test-unsafe"))]
                disabled: false,
            },
            max_wait: self.max_wait,
            connect_timeout: self.limits.connect_timeout,
            upstream_timeout: self.limits.upstream_timeout,
            limits: self.limits.server(),
            metrics_lock_limit: self.metrics_lock_limit,
            holder_check: self.holder_check()?,
            shared: {
                let shared = self.shared.shared(&self.etcd, self.max_wait, self.abort_grace)?;
                if shared.is_some() {
                    self.prefixes_apart()?;
                }
                shared
            },
        })
    }

    /// The etcd holder check, when `--etcd` is given.
    fn holder_check(&self) -> Result<Option<Arc<dyn HolderCheck>>, String> {
        if self.etcd.endpoints.is_empty() || self.trust_tokens {
            return Ok(None);
        }
        let seq = EtcdSequencer::new(self.etcd.options()?, self.key_prefix.clone());
        Ok(Some(Arc::new(seq)))
    }
}

/// Logging and runtime options.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Worker threads: the proxies' event loops, a thread each accepting on the one socket (default: 1 for the
    /// sidecar, one per CPU for the filter); the injector's runtime threads. 1 runs everything on one thread.
    #[arg(long, global = true, env = "FENCEGATE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "FENCEGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Installs the tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// How to reach etcd.
///
/// `--etcd` is optional here because the filter works without etcd (tokens
/// trusted); the sidecar, which cannot, makes it required (`mut_arg` on
/// [`SidecarArgs`]).
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (http:// or https://).
    #[arg(long = "etcd", env = "FENCEGATE_ETCD", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// etcd user (with --etcd-password).
    #[arg(long, env = "FENCEGATE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "FENCEGATE_ETCD_PASSWORD", hide_env_values = true, conflicts_with = "etcd_password_file")]
    pub etcd_password: Option<String>,
    /// File holding the etcd password (a trailing newline is dropped), so it stays out of argv and the environment.
    #[arg(long, env = "FENCEGATE_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed etcd's server certificate.
    #[arg(long, env = "FENCEGATE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "FENCEGATE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "FENCEGATE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Deadline for one etcd call.
    #[arg(long, env = "FENCEGATE_ETCD_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub etcd_timeout: Duration,
}

impl EtcdArgs {
    pub fn options(&self) -> Result<crate::lease::etcd::EtcdOptions, String> {
        Ok(crate::lease::etcd::EtcdOptions {
            endpoints: self.endpoints.clone(),
            user: self.etcd_user.clone(),
            password: self.password()?,
            ca_file: self.etcd_ca.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            call_timeout: self.etcd_timeout,
        })
    }

    /// `--etcd-password`, or the contents of `--etcd-password-file` less one
    /// trailing newline (`\n` or `\r\n`, as editors and `echo` leave it).
    fn password(&self) -> Result<Option<String>, String> {
        let Some(f) = &self.etcd_password_file else { return Ok(self.etcd_password.clone()) };
        let text = std::fs::read_to_string(f).map_err(|e| format!("--etcd-password-file {}: {e}", f.display()))?;
        let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        Ok(Some(text.to_owned()))
    }
}

/// `fencegate sidecar`: hold the app's lock and inject its fencing token.
#[derive(Args, Debug, Clone)]
#[command(mut_arg("endpoints", |a| a.required(true)))]
pub struct SidecarArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The lock this app's instances share.
    #[arg(long, env = "FENCEGATE_LOCK")]
    pub lock: LockName,
    /// This instance's name (the pod name on Kubernetes).
    #[arg(long, env = "FENCEGATE_HOLDER")]
    pub holder: String,
    /// Lease TTL: how long a silent holder keeps the lock in etcd.
    #[arg(long, env = "FENCEGATE_TTL", default_value = "10s", value_parser = duration)]
    pub ttl: Duration,
    /// Self-fencing margin: stop writing this long before the lease could expire (default: TTL/10, at least 200ms).
    #[arg(long, env = "FENCEGATE_SAFETY_MARGIN", value_parser = duration)]
    pub safety_margin: Option<Duration>,
    /// The app's proxy address.
    #[arg(long, env = "FENCEGATE_LISTEN", default_value = "127.0.0.1:7850")]
    pub listen: SocketAddr,
    /// Where writes go: the filter in front of the store.
    #[arg(long, env = "FENCEGATE_UPSTREAM")]
    pub upstream: String,
    /// Send this Host upstream instead of the app's (default: the app's, which S3 clients sign).
    #[arg(long, env = "FENCEGATE_UPSTREAM_HOST")]
    pub upstream_host: Option<String>,
    /// After losing the lock: `auto` campaigns again at once; `manual` refuses writes and waits for
    /// POST /v1/lock/rejoin (for apps that retry writes on their own).
    #[arg(long, env = "FENCEGATE_REJOIN", default_value = "auto")]
    pub rejoin: crate::lease::keeper::Rejoin,
    /// Local API: /v1/lock, /v1/lock/events, /v1/lock/release, /healthz, /readyz, /metrics.
    #[arg(long, env = "FENCEGATE_ADMIN_LISTEN", default_value = "127.0.0.1:7851")]
    pub admin_listen: SocketAddr,
    /// Health port for kubelet probes: only /healthz, /readyz and /metrics (the local API stays on --admin-listen).
    #[arg(long, env = "FENCEGATE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// etcd key prefix for lock queues.
    #[arg(long, env = "FENCEGATE_KEY_PREFIX", default_value = "/fencegate/locks")]
    pub key_prefix: String,
    /// Filters' admin URLs to fence on takeover (repeatable or comma-separated).
    #[arg(long = "fence", env = "FENCEGATE_FENCE", value_delimiter = ',', value_name = "URL")]
    pub fence: Vec<String>,
    /// Longest the takeover waits for filters to confirm the fence (above the filter's drain timeout + abort grace).
    #[arg(long, env = "FENCEGATE_FENCE_TIMEOUT", default_value = "8s", value_parser = duration)]
    pub fence_timeout: Duration,
    /// Longest a write may stream to the upstream after its token was checked (seen within 100 ms); it is also cut
    /// off the moment the lock stops being safely held (default: the TTL).
    #[arg(long, env = "FENCEGATE_WRITE_DEADLINE", value_parser = duration)]
    pub write_deadline: Option<Duration>,
    /// Hold the lock only once every --fence filter has confirmed (retrying without bound).
    #[arg(long, env = "FENCEGATE_FENCE_REQUIRED")]
    pub fence_required: bool,
    /// TESTS ONLY: keep injecting the last token held whatever the lease says (a naive lock client). Exists only
    /// in builds with the `test-unsafe` feature, never in the release binary.
    #[cfg(feature = "test-unsafe")]
    #[arg(long, hide = true, env = "FENCEGATE_UNSAFE_NO_SELF_FENCE")]
    pub unsafe_no_self_fence: bool,
    /// After POST /v1/lock/release, wait this long before campaigning again.
    #[arg(long, env = "FENCEGATE_RELEASE_PAUSE", default_value = "1s", value_parser = duration)]
    pub release_pause: Duration,
    /// /readyz answers 200 even when this instance does not hold the lock.
    #[arg(long, env = "FENCEGATE_READY_ALWAYS")]
    pub ready_always: bool,
    /// Refuse reads too while the lock is not held (default: reads always pass).
    #[arg(long, env = "FENCEGATE_READS_NEED_LEASE")]
    pub reads_need_lease: bool,
    /// Methods that are reads (everything else is a write).
    #[arg(long, env = "FENCEGATE_READ_METHODS", default_value = "GET,HEAD,OPTIONS,TRACE,PROPFIND")]
    pub read_methods: String,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl SidecarArgs {
    pub fn config(&self) -> Result<crate::sidecar::SidecarConfig, String> {
        use crate::lease::keeper::{default_margin, KeeperConfig};
        let margin = self.safety_margin.unwrap_or_else(|| default_margin(self.ttl));
        if margin > self.ttl / 2 {
            return Err(format!(
                "--safety-margin ({margin:?}) must be at most half of --ttl ({:?}): a larger one leaves too little time to hold",
                self.ttl
            ));
        }
        if margin >= self.ttl {
            return Err(format!("--safety-margin ({margin:?}) must be below --ttl ({:?})", self.ttl));
        }
        if self.ttl < Duration::from_secs(2) {
            return Err("--ttl must be at least 2s (etcd's smallest lease)".into());
        }
        let keeper = KeeperConfig {
            lock: self.lock.clone(),
            holder: self.holder.clone(),
            ttl: self.ttl,
            margin,
            key_prefix: self.key_prefix.clone(),
            fence_timeout: self.fence_timeout,
            fence_required: self.fence_required,
            release_pause: self.release_pause,
            rejoin: self.rejoin,
        };
        let mut c = crate::sidecar::SidecarConfig::new(keeper, self.upstream.clone());
        c.fence_urls = self.fence.clone();
        c.upstream_host = self.upstream_host.clone();
        c.write_deadline = self.write_deadline.unwrap_or(self.ttl);
        c.read_methods = ReadMethods::parse(&self.read_methods)?;
        c.reads_need_lease = self.reads_need_lease;
        c.ready_always = self.ready_always;
        #[cfg(feature = "test-unsafe")]
        {
            c.unsafe_no_self_fence = self.unsafe_no_self_fence;
        }
        c.connect_timeout = self.limits.connect_timeout;
        c.upstream_timeout = self.limits.upstream_timeout;
        c.limits = self.limits.server();
        Ok(c)
    }
}

/// `fencegate injector`: the Kubernetes mutating admission webhook.
#[derive(Args, Debug, Clone)]
pub struct InjectorArgs {
    /// HTTPS address (POST /mutate, GET /healthz); `[::]` takes IPv4 too, and falls back to 0.0.0.0 where IPv6 is off.
    #[arg(long, env = "FENCEGATE_LISTEN", default_value = "[::]:8443")]
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "FENCEGATE_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// TLS private key (PEM); re-read when it changes.
    #[arg(long, env = "FENCEGATE_TLS_KEY")]
    pub tls_key: PathBuf,
    /// How often to check the TLS files for changes.
    #[arg(long, env = "FENCEGATE_TLS_RELOAD", default_value = "5s", value_parser = duration)]
    pub tls_reload: Duration,
    /// Sidecar image.
    #[arg(long, env = "FENCEGATE_IMAGE", default_value = "ghcr.io/fencegate/fencegate:0.1.0")]
    pub image: String,
    #[arg(long, env = "FENCEGATE_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// etcd endpoints given to sidecars (comma-separated).
    #[arg(long, env = "FENCEGATE_ETCD_ENDPOINTS", default_value = "http://etcd:2379")]
    pub etcd_endpoints: String,
    /// Secret (ca.crt, tls.crt, tls.key) mounted into sidecars for etcd TLS.
    #[arg(long, env = "FENCEGATE_ETCD_TLS_SECRET")]
    pub etcd_tls_secret: Option<String>,
    /// Lease TTL when a pod does not set fencegate.io/ttl.
    #[arg(long, env = "FENCEGATE_DEFAULT_TTL", default_value = "10s", value_parser = duration)]
    pub default_ttl: Duration,
    #[arg(long, env = "FENCEGATE_CPU_REQUEST", default_value = "10m")]
    pub cpu_request: String,
    #[arg(long, env = "FENCEGATE_MEMORY_REQUEST", default_value = "16Mi")]
    pub memory_request: String,
    #[arg(long, env = "FENCEGATE_CPU_LIMIT")]
    pub cpu_limit: Option<String>,
    #[arg(long, env = "FENCEGATE_MEMORY_LIMIT", default_value = "64Mi")]
    pub memory_limit: Option<String>,
    #[arg(long, env = "FENCEGATE_PROXY_PORT", default_value_t = crate::injector::patch::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    #[arg(long, env = "FENCEGATE_ADMIN_PORT", default_value_t = crate::injector::patch::DEFAULT_ADMIN_PORT)]
    pub admin_port: u16,
    #[arg(long, env = "FENCEGATE_HEALTH_PORT", default_value_t = crate::injector::patch::DEFAULT_HEALTH_PORT)]
    pub health_port: u16,
    /// Inject a plain container instead of a native sidecar: only for 1.30-1.32 clusters with the SidecarContainers
    /// feature gate switched off (its preStop sleep needs 1.30). Pods with restartPolicy Never/OnFailure (Jobs) are then
    /// not injected: a plain sidecar never exits, so they would never complete.
    #[arg(long, env = "FENCEGATE_LEGACY_SIDECAR")]
    pub legacy_sidecar: bool,
    /// Deny pods with bad fencegate.io annotations (default: admit unchanged, with a warning).
    #[arg(long, env = "FENCEGATE_STRICT")]
    pub strict: bool,
    /// Use fencegate.io/lock as is (default: the lock is NAMESPACE.LOCK, so a lock belongs to its namespace).
    #[arg(long, env = "FENCEGATE_CLUSTER_WIDE_LOCKS")]
    pub cluster_wide_locks: bool,
}

impl InjectorArgs {
    pub fn config(&self) -> crate::injector::InjectorConfig {
        crate::injector::InjectorConfig {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_tls_secret: self.etcd_tls_secret.clone().filter(|s| !s.is_empty()),
            default_ttl: self.default_ttl,
            cpu_request: self.cpu_request.clone(),
            memory_request: self.memory_request.clone(),
            cpu_limit: self.cpu_limit.clone().filter(|s| !s.is_empty()),
            memory_limit: self.memory_limit.clone().filter(|s| !s.is_empty()),
            proxy_port: self.proxy_port,
            admin_port: self.admin_port,
            health_port: self.health_port,
            native_sidecar: !self.legacy_sidecar,
            strict: self.strict,
            cluster_wide_locks: self.cluster_wide_locks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Etcd {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    #[derive(Parser)]
    struct Sidecar {
        #[command(flatten)]
        s: SidecarArgs,
    }

    #[derive(Parser)]
    struct Filter {
        #[command(flatten)]
        f: FilterArgs,
    }

    #[derive(Parser)]
    struct FilterOrRepair {
        #[command(flatten)]
        f: FilterCmd,
    }

    /// A replica stops writing `--abort-grace` plus a tenth of its TTL
    /// before its registration can expire, and needs half the TTL (whole
    /// seconds) to write in.
    #[test]
    fn a_replica_ttl_too_short_for_the_abort_grace_is_refused() {
        let base = ["t", "--upstream", "http://s", "--state-dir", "/d", "--lock", "l", "--etcd", "http://e:2379"];
        let config = |more: &[&str]| {
            let args = [&base[..], &["--shared-marks", "--replica-id", "r1"], more].concat();
            Filter::try_parse_from(args).unwrap().f.config().map(|c| c.shared.unwrap().margin)
        };
        let e = config(&["--replica-ttl", "2s"]).unwrap_err();
        assert!(e.contains("give --replica-ttl 3s or more"), "{e}");
        assert_eq!(config(&["--replica-ttl", "3s"]), Ok(Duration::from_millis(1300)));
        assert_eq!(config(&["--replica-ttl", "2s", "--abort-grace", "500ms"]), Ok(Duration::from_millis(700)));
        assert_eq!(config(&[]), Ok(Duration::from_secs(2)), "the defaults: 10 s TTL, 1 s grace");
        // etcd grants 3 s for 3.9 s: 1.94 s of margin leaves less than half.
        let e = config(&["--replica-ttl", "3900ms", "--abort-grace", "1550ms"]).unwrap_err();
        assert!(e.contains("whole seconds"), "{e}");
        for nested in [["--key-prefix", "/fencegate"], ["--marks-prefix", "/fencegate/locks/x"]] {
            let e = config(&nested).unwrap_err();
            assert!(e.contains("nest"), "{e}");
        }
        assert!(config(&["--marks-prefix", "/fencegate/locksmith"]).is_ok(), "a prefix of the name, not of the path");
        let e = config(&["--replica-ttl", "5s", "--abort-grace", "3s"]).unwrap_err();
        assert!(e.contains("give --replica-ttl 8s or more"), "{e}");
        assert!(config(&["--replica-ttl", "8s", "--abort-grace", "3s"]).is_ok());
    }

    #[test]
    fn filter_runs_or_sets_a_mark() {
        let run = FilterOrRepair::try_parse_from(["t", "--upstream", "http://s", "--state-dir", "/d", "--lock", "l"]);
        let run = run.unwrap().f;
        assert!(run.action.is_none() && run.run.config().is_ok());
        let set = ["t", "set-mark", "--state-dir", "/d", "--lock", "l", "--token", "5"];
        let set = FilterOrRepair::try_parse_from(set).unwrap().f;
        assert!(matches!(set.action, Some(FilterAction::SetMark(ref a)) if a.token.get() == 5), "{set:?}");
        let big = ["t", "set-mark", "--state-dir", "/d", "--lock", "l", "--token", "9223372036854775808"];
        assert!(FilterOrRepair::try_parse_from(big).is_err());
        assert!(FilterOrRepair::try_parse_from(["t", "--state-dir", "/d", "--lock", "l"]).is_err());
    }

    /// Found in review: with both, the filter matched a virtual-hosted
    /// request by the client's `Host` and the store, sent another `Host`,
    /// read the path as another bucket.
    #[test]
    fn s3_domain_and_upstream_host_exclude_each_other() {
        let f = ["t", "--upstream", "http://s", "--state-dir", "/d", "--lock", "l", "--store", "s3"];
        let with = |more: &[&str]| Filter::try_parse_from([&f[..], more].concat()).unwrap().f.config();
        assert!(with(&["--s3-domain", "s3.test"]).is_ok());
        assert!(with(&["--upstream-host", "store"]).is_ok());
        let both = with(&["--s3-domain", "s3.test", "--upstream-host", "store"]).unwrap_err();
        assert!(both.contains("exclude each other"), "{both}");
        let vhost = ["t", "--upstream", "http://Bkt.S3.test:8333", "--state-dir", "/d", "--lock", "l", "--store", "s3"];
        let under = Filter::try_parse_from([&vhost[..], &["--s3-domain", "s3.test"]].concat()).unwrap().f.config();
        assert!(under.unwrap_err().contains("virtual-hosted name"));
        let outside = Filter::try_parse_from([&vhost[..], &["--s3-domain", "other.test"]].concat()).unwrap();
        assert!(outside.f.config().is_ok());
        for bad in ["S3.test", ".s3.test", "s3.test.", "s3..test", "a,b.test", ""] {
            assert!(with(&["--s3-domain", bad]).unwrap_err().contains("lower case"), "{bad}");
        }
    }

    /// `--etcd` is required for the sidecar, optional for the filter (no
    /// etcd: verification off).
    #[test]
    fn etcd_is_required_for_the_sidecar_only() {
        let base = ["t", "--lock", "l", "--holder", "h", "--upstream", "http://f"];
        let r = Sidecar::try_parse_from(base);
        assert!(r.is_err_and(|e| e.to_string().contains("--etcd")));
        assert!(Sidecar::try_parse_from([&base[..], &["--etcd", "http://e:2379"]].concat()).is_ok());
        let f = ["t", "--upstream", "http://s", "--state-dir", "/tmp/x", "--lock", "l"];
        let off = Filter::try_parse_from(f).unwrap().f;
        assert!(off.config().unwrap().holder_check.is_none());
        let on = Filter::try_parse_from([&f[..], &["--etcd", "http://e:2379", "--key-prefix", "/p"]].concat()).unwrap();
        assert!(on.f.config().unwrap().holder_check.is_some());
    }

    #[test]
    fn etcd_password_from_a_file_or_a_flag_not_both() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "s3cret \n").unwrap();
        let f = f.display().to_string();
        let parse = |args: &[&str]| Etcd::try_parse_from([&["t", "--etcd", "http://e:2379"], args].concat());
        let o = parse(&["--etcd-password-file", &f]).unwrap().etcd.options().unwrap();
        assert_eq!(o.password.as_deref(), Some("s3cret "), "only the trailing newline goes");
        let o = parse(&["--etcd-password", "pw"]).unwrap().etcd.options().unwrap();
        assert_eq!(o.password.as_deref(), Some("pw"));
        assert!(parse(&["--etcd-password", "pw", "--etcd-password-file", &f]).is_err());
        assert!(parse(&["--etcd-password-file", "/nonexistent/pw"]).unwrap().etcd.options().is_err());
    }
}
