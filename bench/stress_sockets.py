"""Phase 3 over raw sockets: cut-off and slow-drip uploads, lying Content-Lengths, idle half-open
connections and a flood of stuck uploads past the server's file descriptors.
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stress_inputs import make_clips
from stress_run import BOUNDARY, Answer, PhaseStats, Run, classify

# ------------------------------------------------------------------------------ raw-socket clients


def multipart(video: bytes, filename: str = "clip.mp4", fields: dict[str, str] | None = None) -> bytes:
    """A multipart/form-data body with BOUNDARY: the text fields, then the video part."""
    parts = []
    for name, value in (fields or {}).items():
        value = value.encode() if isinstance(value, str) else value
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value
                     + b"\r\n")
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + video + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_head(port: int, length: int | None, chunked: bool = False, path: str = "/caption") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP response from a raw socket; None when the server sends nothing within timeout_s or closes."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    except (TimeoutError, OSError):
        return None


def readable(socks: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """The sockets with something to read (epoll: select() cannot watch descriptors above 1023)."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(timeout_s)]


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def abort(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed client or a dropped network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


def phase_slow(run: Run) -> None:
    phase = run.begin("slow")
    port = run.server.port
    video = make_clips(run.tmp / "slow", 1, offset=100)[0]
    body = multipart(video, fields={"max_new_tokens": run.max_new_tokens} if run.max_new_tokens else None)

    def cut(kind: str) -> None:
        """Start an upload and go away before it is complete."""
        sock = connect(port)
        if kind == "half body, close":
            sock.sendall(request_head(port, len(body)) + body[:len(body) // 2])
            time.sleep(0.3)
            sock.close()
        elif kind == "half body, reset":
            sock.sendall(request_head(port, len(body)) + body[:len(body) // 2])
            time.sleep(0.3)
            abort(sock)
        elif kind == "chunked, no last chunk":
            piece = body[:len(body) // 2]
            sock.sendall(request_head(port, None, chunked=True) + f"{len(piece):x}\r\n".encode() + piece
                         + b"\r\n")
            time.sleep(0.3)
            sock.close()
        elif kind == "headers only":
            sock.sendall(request_head(port, len(body)))
            time.sleep(0.3)
            abort(sock)
        elif kind == "larger Content-Length":
            # the whole body, but a Content-Length promising 1000 more bytes: the server must wait, not answer
            sock.sendall(request_head(port, len(body) + 1000) + body)
            answer = read_answer(sock, 2.0)
            if answer is not None:
                phase.violate(f"larger Content-Length: answered {answer[0]} before the body was complete")
            sock.close()
        phase.tried += 1
        phase.cut_on_purpose += 1

    kinds = ["half body, close", "half body, reset", "chunked, no last chunk", "headers only",
             "larger Content-Length"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(cut, kinds * 2))

    def raw(what: str, payload: bytes, allowed: set[int], pieces: int = 1, pause_s: float = 0.0) -> Answer:
        """Send `payload` (`pieces` sends, `pause_s` apart; stop early if an answer comes) and read it."""
        started = time.perf_counter()
        sent = 0
        with connect(port) as sock:
            try:
                step = max(1, len(payload) // pieces)
                for at in range(0, len(payload), step):
                    if readable([sock], 0):
                        break   # the server answered early (413, 422): stop sending, as a real client would
                    sock.sendall(payload[at:at + step])
                    sent = at + step
                    if pause_s:
                        time.sleep(pause_s)
            except OSError:
                pass
            got = read_answer(sock, 120)
        sent_to[what] = min(sent, len(payload))
        if got is None:
            return Answer(None, None, None, time.perf_counter() - started, f"{what}: no answer")
        return classify(*got, time.perf_counter() - started, what, allowed)

    sent_to: dict[str, int] = {}

    # slow-drip bodies: a few bytes at a time, while a normal client is served meanwhile
    drip = request_head(port, len(body)) + body
    pieces = len(drip) // run.plan.drip_bytes
    with ThreadPoolExecutor(run.plan.drip_clients + 1) as pool:
        drips = [pool.submit(raw, "slow drip", drip, {200}, pieces, run.plan.drip_interval_s)
                 for _ in range(run.plan.drip_clients)]
        time.sleep(0.5)
        normal = run.post_video(make_clips(run.tmp / "slow", 1, offset=101)[0], "normal during drips",
                                allowed={200})
        phase.count(normal)
        phase.figures["normal request during drips s"] = f"{normal.seconds:.2f}"
        started = time.perf_counter()
        for future in drips:
            answer = future.result()
            phase.count(answer)
            if answer.status == 200:
                run.acknowledge(answer.body, video, "slow drip", answer)
        phase.figures["slow drip s"] = f"{time.perf_counter() - started + 0.5:.1f}"

    # a Content-Length shorter than the body: the multipart ends early (400); the rest is not a request
    short = request_head(port, len(body) - 100) + body
    phase.count(raw("shorter Content-Length", short, {400}))
    # a 10 MB form field, chunked (no Content-Length to refuse it by): 422 after its first KB, not buffered
    big_field = multipart(video, fields={"checkpoint": "x" * (10 * 2**20)})
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n"
                      for c in (big_field[at:at + 2**16] for at in range(0, len(big_field), 2**16)))
    answer = raw("10 MB checkpoint field", request_head(port, None, chunked=True) + chunks + b"0\r\n\r\n",
                 {422}, pieces=len(big_field) // 2**16)
    phase.count(answer)
    phase.figures["10 MB field refused after sending MB"] = f"{sent_to['10 MB checkpoint field'] / 2**20:.1f}"
    # half-open connections that never finish their request line, while a normal request is served
    idle = [connect(port) for _ in range(run.plan.idle_sockets)]
    for sock in idle:
        sock.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\n")
    phase.count(run.post_video(make_clips(run.tmp / "slow", 1, offset=102)[0], "normal beside idle sockets",
                               allowed={200}))
    for sock in idle:
        sock.close()
    phase.tried += len(idle)
    phase.cut_on_purpose += len(idle)
    flood(run, phase, body)
    # not HTTP at all
    with connect(port) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + run.rng.randbytes(500))
        read_answer(sock, 5)
    phase.tried += 1
    phase.cut_on_purpose += 1
    run.settle(phase)


def wait_until_taken_in(tmp_dir: Path, quiet_s: float = 2.0, limit_s: float = 60.0) -> None:
    """Wait until the server has taken in what it will of a flood: its stored-upload count has not changed for
    quiet_s (a fixed sleep was too short on a loaded machine: the flood then never reached the fd limit)."""
    deadline = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(1 for _ in tmp_dir.iterdir())
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)


def flood(run: Run, phase: PhaseStats, body: bytes) -> None:
    """More stuck half-uploads than the server has file descriptors (each holds a socket and a temp file).

    Those it cannot store must get 503 + Retry-After (not a 500); once they go away everything is served.
    """
    port, n = run.server.port, run.plan.flood
    head = request_head(port, len(body)) + body[:len(body) // 2]
    socks = []
    for _ in range(n):
        sock = connect(port)
        sock.sendall(head)
        socks.append(sock)
    phase.tried += n
    wait_until_taken_in(run.tmp_dir)
    answered: list[tuple[int, dict[str, str], bytes]] = []
    pending = list(socks)
    while pending:
        ready = readable(pending, 3.0)
        if not ready:
            break   # quiet seconds: the rest are stored and waiting for their bodies
        for sock in ready:
            got = read_answer(sock, 5)
            pending.remove(sock)
            if got is not None:
                answered.append(got)
    stored = len(list(run.tmp_dir.iterdir()))
    with ThreadPoolExecutor(1) as pool:   # a normal client while the server is out of descriptors
        normal = pool.submit(run.post_video, make_clips(run.tmp / "slow", 1, offset=103)[0],
                             "normal during the descriptor flood", allowed={200, 503})
        time.sleep(1.0)
        for sock in socks:
            sock.close()
        phase.count(normal.result())
    for got in answered:
        phase.count(classify(*got, 0.0, "descriptor flood", {503}))
    phase.cut_on_purpose += n - len(answered)
    phase.figures["fd flood: stuck uploads stored / 503"] = f"{stored} / {len(answered)} (of {n})"
    served_after(run, phase, make_clips(run.tmp / "slow", 1, offset=104)[0], "normal after the flood")


def served_after(run: Run, phase: PhaseStats, data: bytes, what: str, tries: int = 20) -> None:
    """POST until served, retrying 503s (after a second) as a client should; a 200 must come in the end."""
    for _ in range(tries):
        answer = run.post_video(data, what, allowed={200, 503})
        phase.count(answer)
        if answer.status != 503:
            return
        time.sleep(1.0)
    phase.violate(f"{what}: still 503 after {tries} tries")
