//! The plugin's socket: HTTP/1.1 over a unix socket (`/run/docker/plugins/weft.sock`, where
//! dockerd looks for legacy plugins), POST /<Call> with a JSON body; errors as HTTP 500 with
//! `{"Err": ...}`.

use crate::Plugin;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/weft.sock";
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// Binds `socket` (root only; a stale socket of a dead plugin is replaced).
pub fn bind(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let l = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::UnixListener, plugin: Arc<Plugin>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let plugin = plugin.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = match req.into_body().collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => Bytes::new(),
                        };
                        let (code, out) = match plugin.handle(&path, &body).await {
                            Ok(v) => {
                                tracing::debug!(call = %path, "ok");
                                (StatusCode::OK, v)
                            }
                            Err(e) => {
                                tracing::warn!(call = %path, error = %e, "refused");
                                (
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    serde_json::json!({"Err": e.to_string()}),
                                )
                            }
                        };
                        let mut r = Response::new(Full::new(Bytes::from(out.to_string())));
                        *r.status_mut() = code;
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
