//! A lean HTTP/1.1 load generator for the intake scenarios: one keep-alive connection per sender,
//! each request written as prepared bytes, each answer read by its status line and
//! `Content-Length` only. Issue 17's figures were taken with wrk, which costs a few microseconds
//! of CPU per request; reqwest cost about 90 µs here, as much as the service itself spent on a
//! callback, and on two cores every microsecond the generator takes is one the service and the
//! database do not get. The bare-axum limit beside each figure is driven by the same generator.

use super::{load_with, Stats};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One sender's connection, opened on first use and again after any failure.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its whole answer; the answer's status code.
    pub async fn send(&mut self, request: &[u8]) -> Result<u16, String> {
        let result = self.exchange(request).await;
        if result.is_err() {
            // The connection's state is unknown after a failure: the next request opens a new one.
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<u16, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().ok_or("no connection")?;
        stream.write_all(request).await.map_err(|e| e.to_string())?;
        self.buf.clear();
        loop {
            if let Some((status, len)) = complete_answer(&self.buf)? {
                self.buf.drain(..len);
                return Ok(status);
            }
            if self.buf.len() > 1 << 20 {
                return Err("answer over 1 MiB".into());
            }
            let mut chunk = [0u8; 4096];
            let got = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if got == 0 {
                return Err("connection closed before the answer ended".into());
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

/// The status and total length of the answer at the start of `buf`, once all of it is there.
fn complete_answer(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let head = match answer.parse(buf).map_err(|e| e.to_string())? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(head) => head,
    };
    let mut body = None;
    for h in answer.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|e| e.to_string())?;
            body = Some(text.trim().parse::<usize>().map_err(|e| e.to_string())?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not read by the lean generator".into());
        }
    }
    let total = head + body.unwrap_or(0);
    Ok((buf.len() >= total).then(|| (answer.code.unwrap_or(0), total)))
}

/// A request as bytes: `method path`, JSON `body` (empty for none) and extra header lines.
pub fn request(method: &str, path: &str, addr: SocketAddr, headers: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}content-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        r.push_str("content-type: application/json\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// Sends `request(i)` for i in 0..n over `concurrency` connections to `addr`; an answer that is
/// not 2xx counts as an error.
pub async fn load_raw<F>(
    label: &str,
    n: usize,
    concurrency: usize,
    addr: SocketAddr,
    request: F,
) -> Stats
where
    F: Fn(usize) -> Vec<u8> + Send + Sync + 'static,
{
    let request = std::sync::Arc::new(request);
    load_with(
        label,
        n,
        concurrency,
        move || Conn::new(addr),
        move |mut conn: Conn, i| {
            let bytes = request(i);
            async move {
                let result = match conn.send(&bytes).await {
                    Ok(status) if (200..300).contains(&status) => Ok(()),
                    Ok(status) => Err(format!("status {status}")),
                    Err(e) => Err(e),
                };
                (conn, result)
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_complete_only_with_its_whole_body() {
        let full = b"HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(complete_answer(&full[..30]), Ok(None));
        assert_eq!(complete_answer(&full[..full.len() - 1]), Ok(None));
        assert_eq!(complete_answer(full), Ok(Some((202, full.len()))));
        let empty = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(complete_answer(empty), Ok(Some((200, empty.len()))));
        assert!(complete_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }
}
