//! A TCP front for tests, as a load balancer in front of several replicas: each new
//! connection goes to the first backend, in order, that accepts it, and bytes are copied both
//! ways until either side closes. Runs on a runtime of its own until dropped (from a
//! synchronous test or inside an async one alike).
#![allow(dead_code)]

use std::net::SocketAddr;

pub struct Front {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Front {
    pub fn start(backends: Vec<SocketAddr>) -> Front {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                tokio::spawn(async move {
                    for b in backends {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(b).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Front { addr, rt: Some(rt) }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
