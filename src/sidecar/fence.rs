//! The sidecar's [`Fencer`]: the fence protocol ([`crate::fence`]) over HTTP
//! to each filter's admin URL (`--fence`).

use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::fence::{self, FenceRequest, Outcome};
use crate::lease::Fencer;
use crate::proxy::{self, SimpleClient};
use crate::token::{LockName, Token};

/// Fences filters by their admin base URLs.
pub struct HttpFencer {
    urls: Vec<String>,
    client: SimpleClient,
}

impl HttpFencer {
    pub fn new(urls: Vec<String>) -> HttpFencer {
        HttpFencer { urls, client: proxy::simple_client() }
    }
}

impl Fencer for HttpFencer {
    fn targets(&self) -> &[String] {
        &self.urls
    }

    fn fence<'a>(
        &'a self,
        url: &'a str,
        lock: &'a LockName,
        token: Token,
        timeout: Duration,
    ) -> BoxFuture<'a, Outcome> {
        async move {
            let uri = format!("{}{}", url.trim_end_matches('/'), fence::path(lock));
            let body = FenceRequest { token: token.get(), timeout_ms: Some(timeout.as_millis() as u64) };
            let body = serde_json::to_vec(&body).expect("serializable");
            // The filter may wait `timeout` at its barrier; give the answer a second to travel.
            let answer = proxy::call(
                &self.client,
                "POST",
                &uri,
                Some("application/json"),
                body,
                timeout + Duration::from_secs(1),
            )
            .await;
            match answer {
                Ok((status, body)) => match Outcome::from_answer(status.as_u16(), &body) {
                    Outcome::Failed(why) => Outcome::Failed(format!("{uri}: {why}")),
                    o => o,
                },
                Err(why) => Outcome::Failed(why),
            }
        }
        .boxed()
    }
}
