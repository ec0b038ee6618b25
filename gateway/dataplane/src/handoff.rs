//! Handing a client connection to the Python gateway: its socket, with the
//! bytes already read from it, over a Unix socket (SCM_RIGHTS).
//!
//! Each handoff is one message on the stream: an 8-byte big-endian length and
//! that many bytes, the connection's descriptor attached to its first byte.
//! From then on the connection is the Python gateway's: it answers the request
//! (and every later one on it) by its own rules, as if it had accepted it.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

pub type Sender = mpsc::Sender<(OwnedFd, Vec<u8>)>;

fn send_with_fd(sock: &UnixStream, data: &[u8], fd: i32) -> std::io::Result<usize> {
    // SAFETY: plain sendmsg with one SCM_RIGHTS control message; the buffers outlive the call.
    unsafe {
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        let space = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The thread that sends handoffs (blocking writes, in order); the process ends if the Python side is gone.
pub fn start(mut sock: UnixStream) -> Sender {
    let (tx, rx) = mpsc::channel::<(OwnedFd, Vec<u8>)>();
    std::thread::Builder::new().name("handoff".into()).spawn(move || {
        for (fd, bytes) in rx {
            let mut message = (bytes.len() as u64).to_be_bytes().to_vec();
            message.extend_from_slice(&bytes);
            let sent = match send_with_fd(&sock, &message, fd.as_raw_fd()) {
                Ok(n) => sock.write_all(&message[n..]),
                Err(e) => Err(e),
            };
            drop(fd); // the Python side holds its own copy now
            if let Err(e) = sent {
                crate::logline::event("error", "the Python gateway's handoff socket failed; stopping",
                                      &[("error", e.to_string())]);
                std::process::exit(1);
            }
        }
    }).expect("handoff thread");
    tx
}
