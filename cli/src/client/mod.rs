//! The client commands (`hangar capsule|op|host …`): a thin HTTP client of the v1 API, with
//! table or JSON output, `--wait` progress, and exit codes scripts can rely on
//! ([`EXIT_CODES`]).

pub mod capsule;
pub mod host;
pub mod operation;
mod table;
mod wait;

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::Value;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed or was cancelled (with --wait, and `op wait`)
  2  usage error
  3  the API refused the request (4xx); `error: <code>: <message>` on stderr
  4  the API is unreachable or failed (5xx)
`capsule exec` exits with the command's own exit code once it ran.";

/// Where the API is and who is asking; every client command takes these.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Base URL of the Hangar API.
    #[arg(
        long,
        global = true,
        env = "HANGAR_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// API key (a team key, or an admin key for admin commands).
    #[arg(long, global = true, env = "HANGAR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// `table` (aligned columns) or `json` (the API's JSON).
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Why a client command did not succeed; each maps to one exit code.
#[derive(Debug)]
pub enum Failure {
    /// The awaited operation ended failed or cancelled.
    OperationFailed { code: String, message: String },
    /// A 4xx from the API, with its envelope's code.
    Refused { code: String, message: String },
    /// No answer, or a 5xx.
    Unavailable { code: String, message: String },
}

impl Failure {
    fn exit_code(&self) -> i32 {
        match self {
            Failure::OperationFailed { .. } => 1,
            Failure::Refused { .. } => 3,
            Failure::Unavailable { .. } => 4,
        }
    }

    /// Prints the one error line and returns the exit code.
    fn report(&self) -> i32 {
        let (Failure::OperationFailed { code, message }
        | Failure::Refused { code, message }
        | Failure::Unavailable { code, message }) = self;
        let message = message.replace('\n', " ");
        eprintln!("error: {code}: {message}");
        self.exit_code()
    }
}

/// The client commands of the `hangar` binary.
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Capsules: create, list, get, pause, resume, snapshot, exec, destroy.
    Capsule(capsule::CapsuleArgs),
    /// Operations (job handles): get, wait, list, retry, cancel.
    Op(operation::OpArgs),
    /// Hosts (admin keys): list, cordon, uncordon, drain.
    Host(host::HostArgs),
}

/// Runs a client command to its exit code ([`EXIT_CODES`]).
pub async fn run(command: ClientCommand) -> i32 {
    let result = match command {
        ClientCommand::Capsule(args) => args.run().await,
        ClientCommand::Op(args) => args.run().await,
        ClientCommand::Host(args) => args.run().await,
    };
    result.unwrap_or_else(|failure| failure.report())
}

/// An HTTP client of one API, with its key and output format.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    pub output: Output,
}

/// Requests that are not long polls end after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    pub fn new(args: &ClientArgs) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: args.url.trim_end_matches('/').to_owned(),
            key: args.api_key.clone(),
            output: args.output,
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(Method::GET, path, None, REQUEST_TIMEOUT).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.send(Method::POST, path, Some(body), REQUEST_TIMEOUT)
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.send(Method::DELETE, path, None, REQUEST_TIMEOUT).await
    }

    /// One request; a non-2xx answer becomes a [`Failure`] carrying the envelope's code.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let unreachable = |e: reqwest::Error| Failure::Unavailable {
            code: "unreachable".into(),
            message: format!("{}: {}", self.base, error_chain(&e)),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        let code = error["code"]
            .as_str()
            .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned);
        let message = error["message"]
            .as_str()
            .map_or_else(|| text.chars().take(200).collect(), str::to_owned);
        if status.is_server_error() {
            Err(Failure::Unavailable { code, message })
        } else {
            Err(Failure::Refused { code, message })
        }
    }

    /// Prints `value` as JSON, or as `table` renders it.
    pub fn print(&self, value: &Value, table: impl FnOnce(&Value) -> String) {
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON values serialize")
            ),
            Output::Table => print!("{}", table(value)),
        }
    }
}

/// A reqwest error and its causes on one line ("error sending request: connection refused").
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `value[key]` as text for a table cell (`-` when missing or null).
fn cell(value: &Value, key: &str) -> String {
    match &value[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
