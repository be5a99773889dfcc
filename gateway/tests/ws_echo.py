# A WebSocket echo server on 127.0.0.1:8765 in Python's standard library (the
# images have no websockets package); plain GETs get "plain". Run in a guest
# by the HTTP suite and the E2B SDK scripts.
import base64, hashlib, http.server, struct
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() != "websocket":
            self.send_response(200); self.send_header("Content-Length", "6"); self.end_headers()
            self.wfile.write(b"plain\n"); return
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.send_response(101)
        self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers(); self.wfile.flush()
        r = self.rfile
        while True:
            h = r.read(2)
            if len(h) < 2: return
            op, n = h[0] & 15, h[1] & 127
            if n == 126: n = struct.unpack(">H", r.read(2))[0]
            elif n == 127: n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if h[1] & 128 else bytes(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if op == 8:
                self.wfile.write(b"\x88\x00"); self.wfile.flush(); self.close_connection = True; return
            size = bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else bytes([127]) + struct.pack(">Q", n)
            self.wfile.write(bytes([0x80 | op]) + size + data); self.wfile.flush()
http.server.ThreadingHTTPServer(("127.0.0.1", 8765), H).serve_forever()
