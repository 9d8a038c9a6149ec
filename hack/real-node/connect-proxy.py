#!/usr/bin/env python3
"""An HTTP CONNECT proxy on a UNIX socket: kube-apiserver's egress selector ("cluster") dials the
kubelets and pods of hack/real-cluster.sh through it. It is started inside the cluster's own network
namespace, so the API server (on the machine's 127.0.0.1) reaches node and pod addresses without a
route in the machine's network. Only CONNECT to an address inside the given networks is served.

    connect-proxy.py SOCKET CIDR...
"""
import ipaddress
import os
import socket
import socketserver
import sys
import threading


class Handler(socketserver.StreamRequestHandler):
    rbufsize = 0  # unbuffered: nothing after the request's headers is read before the relay starts

    def handle(self):
        line = self.rfile.readline(4096).decode("latin-1").strip()
        while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
            pass  # the request's headers
        parts = line.split()
        if len(parts) != 3 or parts[0] != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        host, _, port = parts[1].rpartition(":")
        host = host.strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            return
        if not any(address in network for network in ALLOWED):
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            return
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError as error:
            self.wfile.write(f"HTTP/1.1 502 Bad Gateway\r\n\r\n{error}".encode())
            return
        upstream.settimeout(None)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True).start()
        pipe(self.connection, upstream)


def pipe(source, destination):
    try:
        while data := source.recv(65536):
            destination.sendall(data)
    except OSError:
        pass
    finally:
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    path = sys.argv[1]
    ALLOWED = [ipaddress.ip_network(cidr) for cidr in sys.argv[2:]]
    if os.path.exists(path):
        os.unlink(path)
    with Server(path, Handler) as server:
        server.serve_forever()
