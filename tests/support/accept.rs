//! The accept loop the test servers share: a thread that takes connections until the server
//! says it is stopping, and serves each on a thread of its own.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

/// Starts `name-accept`, which serves each connection with `serve` on a `name-conn` thread,
/// until `stopping` says so (checked as each connection arrives; the server's drop makes one
/// to wake it).
pub fn spawn<S: Send + Sync + 'static>(
    listener: TcpListener,
    name: &str,
    shared: Arc<S>,
    stopping: fn(&S) -> bool,
    serve: fn(TcpStream, &S),
) {
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for conn in listener.incoming() {
                if stopping(&shared) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = Arc::clone(&shared);
                let _ = std::thread::Builder::new()
                    .name(conn_name.clone())
                    .spawn(move || serve(conn, &shared));
            }
        })
        .expect("spawn the accept thread");
}
