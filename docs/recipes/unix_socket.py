"""Hand a shared buffer to an unrelated process over a Unix socket, and
take it on the other side: a descriptor and a size cross, never a byte of
the secret."""

import socket

import pkeys


def send_buffer(sock, buffer):
    with buffer.share() as handle:
        socket.send_fds(sock, [f"{handle.size} {handle.label}".encode()], [handle.fd])


def receive_buffer(sock):
    data, fds, _, _ = socket.recv_fds(sock, 256, 1)
    size, _, label = data.decode().partition(" ")
    with pkeys.ShareHandle(fds[0], int(size), label) as handle:
        return pkeys.ProtectedBuffer.from_shared(handle)  # closed until its unlocked()
