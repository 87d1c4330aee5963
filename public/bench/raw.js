// Raw DataChannel baseline (see raw.html): one file over one RTCDataChannel, plain JS.
//
// Signaling: the server's /ws broker with its real JSON protocol (src/protocol.rs), unsealed.
// Peer messages on the channel:
//   sender → receiver  text   {"type":"meta","name":..,"size":..}   once the channel is open
//   receiver → sender  text   {"type":"request"}                     "send me the file"
//   sender → receiver  binary [u32 transfer id BE][u64 offset BE][payload]   (the app's frame)
//   sender → receiver  text   {"type":"end","size":N}                after the last frame
// Flow control as in the app: send while bufferedAmount <= high, else wait for
// 'bufferedamountlow' (threshold = low). No timers, no acks.

const params = new URLSearchParams(location.search);
const ROLE = params.get('role') === 'recv' ? 'recv' : 'send';

/** A positive integer query parameter, or the default. */
function intParam(name, fallback) {
  const v = Number(params.get(name));
  return Number.isSafeInteger(v) && v > 0 ? v : fallback;
}

// The app's defaults; `?chunk=&high=&low=` override them on the sender page.
const CHUNK = intParam('chunk', 65536); // payload bytes per message (capped by maxMessageSize)
const HIGH = intParam('high', 4 * 1024 * 1024);
const LOW = intParam('low', 1024 * 1024);
const READ_BLOCK = 1024 * 1024; // Blob.slice() size
const HEADER_LEN = 12;
const TRANSFER_ID = 1;
const OPFS_NAME = 'raw-bench.bin'; // one scratch file, overwritten by the next download

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const setStatus = (text) => {
  byTestId('status').textContent = text;
};
const mb = (bytes) => (bytes / 1e6).toFixed(1);

function fail(err) {
  console.error(err);
  setStatus(`Error: ${err?.message ?? err}`);
  const fileStatus = byTestId('file-status');
  if (fileStatus) fileStatus.textContent = 'error';
}

// ---------------------------------------------------------------------------------------------
// Signaling and WebRTC helpers

/** Opens /ws; `onMessage(msg)` gets every server message. Returns a function that sends one. */
function connectSignaling(onMessage) {
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`);
  const send = (msg) => ws.send(JSON.stringify(msg));
  ws.onmessage = (e) => {
    try {
      onMessage(JSON.parse(e.data));
    } catch (err) {
      fail(err);
    }
  };
  // The server closes sockets that stay silent for 60 s.
  const ping = setInterval(() => ws.readyState === WebSocket.OPEN && send({ type: 'ping' }), 20_000);
  ws.onclose = (e) => {
    clearInterval(ping);
    console.warn(`signaling closed: ${e.code} ${e.reason}`);
  };
  return send;
}

/** An RTCPeerConnection whose ICE candidates go to `remote` through `signal` (trickle ICE). */
function newPeerConnection(iceServers, remote, signal) {
  const pc = new RTCPeerConnection({ iceServers });
  pc.onicecandidate = ({ candidate }) => {
    if (!candidate) return; // end of candidates: nothing to tell
    signal(remote, {
      type: 'candidate',
      candidate: candidate.candidate,
      sdp_mid: candidate.sdpMid,
      sdp_m_line_index: candidate.sdpMLineIndex,
    });
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === 'failed') fail(new Error('peer connection failed'));
  };
  return pc;
}

/**
 * Applies one signal payload (offer, answer or candidate). Callers chain these on one promise
 * per peer, so a candidate that arrives while the offer is still being applied waits for it.
 */
async function applySignal(pc, payload, remote, signal) {
  switch (payload.type) {
    case 'offer':
      await pc.setRemoteDescription({ type: 'offer', sdp: payload.sdp });
      await pc.setLocalDescription();
      signal(remote, { type: 'answer', sdp: pc.localDescription.sdp });
      break;
    case 'answer':
      await pc.setRemoteDescription({ type: 'answer', sdp: payload.sdp });
      break;
    case 'candidate':
      await pc.addIceCandidate({
        candidate: payload.candidate,
        sdpMid: payload.sdp_mid,
        sdpMLineIndex: payload.sdp_m_line_index,
      });
      break;
  }
}

/** Resolves on the channel's next 'bufferedamountlow'; rejects if it closes first. */
function drained(dc) {
  return new Promise((resolve, reject) => {
    const done = (ok) => () => {
      dc.removeEventListener('bufferedamountlow', onLow);
      dc.removeEventListener('close', onClose);
      ok ? resolve() : reject(new Error('data channel closed while sending'));
    };
    const onLow = done(true);
    const onClose = done(false);
    dc.addEventListener('bufferedamountlow', onLow);
    dc.addEventListener('close', onClose);
  });
}

// ---------------------------------------------------------------------------------------------
// Sender

function runSender() {
  document.getElementById('send').hidden = false;
  document.getElementById('settings').textContent = `chunk=${CHUNK} high=${HIGH} low=${LOW}`;
  const input = byTestId('file-input');
  const peers = new Map(); // receiver peer id → { pc, dc, queue }
  let iceServers = [];
  let file = null;

  const send = connectSignaling((msg) => {
    switch (msg.type) {
      case 'welcome':
        iceServers = msg.ice_servers ?? [];
        send({ type: 'create_share' });
        break;
      case 'share_created': {
        const link = byTestId('share-link');
        link.href = new URL(`raw.html?role=recv&share=${msg.share}`, location.href).href;
        link.textContent = link.href;
        document.getElementById('link-row').hidden = false;
        setStatus('Waiting for a receiver');
        break;
      }
      case 'peer_joined':
        startPeer(msg.peer);
        break;
      case 'signal': {
        const peer = peers.get(msg.from);
        if (!peer) break;
        const payload = JSON.parse(msg.payload);
        peer.queue = peer.queue.then(() => applySignal(peer.pc, payload, msg.from, signal)).catch(fail);
        break;
      }
      case 'peer_left':
        peers.get(msg.peer)?.pc.close();
        peers.delete(msg.peer);
        break;
      case 'error':
        setStatus(`Server error: ${msg.code}: ${msg.message}`);
        break;
    }
  });
  const signal = (to, payload) => send({ type: 'signal', to, payload: JSON.stringify(payload) });

  const sendMeta = (dc) => {
    if (file && dc.readyState === 'open') dc.send(JSON.stringify({ type: 'meta', name: file.name, size: file.size }));
  };
  input.onchange = () => {
    file = input.files[0] ?? null;
    for (const { dc } of peers.values()) sendMeta(dc);
  };

  // A receiver joined: the sender makes the channel and the offer.
  function startPeer(peerId) {
    const pc = newPeerConnection(iceServers, peerId, signal);
    const dc = pc.createDataChannel('raw', { ordered: true }); // reliable: no maxRetransmits
    dc.binaryType = 'arraybuffer';
    dc.bufferedAmountLowThreshold = LOW;
    const peer = { pc, dc, queue: Promise.resolve() };
    peers.set(peerId, peer);
    dc.onopen = () => {
      setStatus('Connected');
      sendMeta(dc);
    };
    dc.onmessage = (e) => {
      if (typeof e.data === 'string' && JSON.parse(e.data).type === 'request') sendFile(pc, dc).catch(fail);
    };
    peer.queue = peer.queue
      .then(async () => {
        await pc.setLocalDescription(); // an offer, since this side made the channel
        signal(peerId, { type: 'offer', sdp: pc.localDescription.sdp });
      })
      .catch(fail);
  }

  // The whole file: 1 MiB blocks read one after another, cut into framed chunks.
  async function sendFile(pc, dc) {
    const f = file;
    if (!f) throw new Error('no file chosen');
    const chunk = Math.max(1, Math.min(CHUNK, (pc.sctp?.maxMessageSize || 65536) - HEADER_LEN));
    // One frame buffer for the whole file: send() copies the bytes it is given, so the buffer
    // can be refilled at once (no garbage per chunk).
    const frame = new Uint8Array(HEADER_LEN + chunk);
    const header = new DataView(frame.buffer);
    header.setUint32(0, TRANSFER_ID);
    const started = performance.now();
    setStatus(`Connected · sending ${f.name}`);
    for (let base = 0; base < f.size; base += READ_BLOCK) {
      const block = new Uint8Array(await f.slice(base, Math.min(base + READ_BLOCK, f.size)).arrayBuffer());
      for (let at = 0; at < block.length; at += chunk) {
        const payload = block.subarray(at, Math.min(at + chunk, block.length));
        header.setBigUint64(4, BigInt(base + at));
        frame.set(payload, HEADER_LEN);
        if (dc.bufferedAmount > HIGH) await drained(dc);
        dc.send(frame.subarray(0, HEADER_LEN + payload.length));
      }
    }
    dc.send(JSON.stringify({ type: 'end', size: f.size }));
    const secs = (performance.now() - started) / 1000;
    setStatus(`Connected · handed ${mb(f.size)} MB to the channel in ${secs.toFixed(1)} s`);
  }
}

// ---------------------------------------------------------------------------------------------
// Receiver

function runReceiver() {
  document.getElementById('recv').hidden = false;
  const share = params.get('share');
  if (!share) return setStatus('Error: no share in the link');
  const button = byTestId('download');
  const fileStatus = byTestId('file-status');
  let sender = null;
  let pc = null;
  let dc = null;
  let queue = Promise.resolve();
  let meta = null;
  let received = 0;
  let started = 0;
  let progress = null;
  const savedUrls = [];

  // The sink: a module worker writing frames into an OPFS file (createSyncAccessHandle exists
  // only in workers). Replies come in order: {ok}, or {error} at any time.
  const worker = new Worker(new URL('raw-worker.js', import.meta.url), { type: 'module' });
  let pending = null;
  worker.onmessage = (e) => {
    if (e.data.error) return fail(new Error(`sink: ${e.data.error}`));
    const p = pending;
    pending = null;
    p?.(e.data);
  };
  const ask = (msg) => new Promise((resolve) => {
    pending = resolve;
    worker.postMessage(msg);
  });

  const send = connectSignaling((msg) => {
    switch (msg.type) {
      case 'welcome':
        pc = newPeerConnection(msg.ice_servers ?? [], null, (_, payload) => signal(payload));
        pc.ondatachannel = (e) => useChannel(e.channel);
        send({ type: 'join', share });
        setStatus('Joining…');
        break;
      case 'joined':
        sender = msg.sender;
        setStatus('Connecting to the sender…');
        break;
      case 'signal': {
        if (msg.from !== sender) break;
        const payload = JSON.parse(msg.payload);
        queue = queue.then(() => applySignal(pc, payload, sender, (_, p) => signal(p))).catch(fail);
        break;
      }
      case 'peer_left':
        if (msg.peer === sender && !fileStatus.textContent.startsWith('done')) setStatus('The sender left');
        break;
      case 'error':
        setStatus(`Server error: ${msg.code}: ${msg.message}`);
        break;
    }
  });
  // Candidates can be gathered before `joined` names the sender: hold them until then.
  const early = [];
  function signal(payload) {
    if (!sender) return early.push(payload);
    for (const p of early.splice(0)) send({ type: 'signal', to: sender, payload: JSON.stringify(p) });
    send({ type: 'signal', to: sender, payload: JSON.stringify(payload) });
  }

  function useChannel(channel) {
    dc = channel;
    dc.binaryType = 'arraybuffer';
    const opened = () => {
      setStatus('Connected');
      if (meta) button.disabled = false;
    };
    if (dc.readyState === 'open') opened();
    else dc.onopen = opened;
    dc.onclose = () => {
      if (!fileStatus.textContent.startsWith('done')) setStatus('Channel closed');
    };
    dc.onmessage = (e) => {
      if (typeof e.data !== 'string') {
        // A frame: hand its buffer to the worker (transferred, not copied).
        received += e.data.byteLength - HEADER_LEN;
        worker.postMessage(e.data, [e.data]);
        return;
      }
      const m = JSON.parse(e.data);
      if (m.type === 'meta') {
        meta = m;
        byTestId('file-name').textContent = `${m.name} (${m.size.toLocaleString('en')} bytes)`;
        button.disabled = dc.readyState !== 'open';
      } else if (m.type === 'end') {
        finish(m.size).catch(fail);
      }
    };
  }

  button.onclick = async () => {
    try {
      button.disabled = true;
      fileStatus.textContent = 'receiving';
      await ask({ cmd: 'open', name: OPFS_NAME }); // the file is ready before the first frame
      received = 0;
      started = performance.now();
      progress = setInterval(() => setStatus(`Connected · received ${mb(received)} MB`), 500);
      dc.send(JSON.stringify({ type: 'request' }));
    } catch (err) {
      fail(err);
    }
  };

  // After the last frame: close the OPFS file, then save it as the app does (object URL + <a download>).
  async function finish(size) {
    const { written } = await ask({ cmd: 'close' });
    clearInterval(progress);
    if (written !== size) throw new Error(`wrote ${written} bytes, the sender sent ${size}`);
    const dir = await navigator.storage.getDirectory();
    const file = await (await dir.getFileHandle(OPFS_NAME)).getFile();
    const url = URL.createObjectURL(file);
    savedUrls.push(url); // kept until the page goes away: the download reads from it
    const a = document.createElement('a');
    a.href = url;
    a.download = meta?.name ?? 'download.bin';
    a.click();
    const secs = (performance.now() - started) / 1000;
    setStatus(`Connected · received ${mb(size)} MB in ${secs.toFixed(1)} s (${mb(size / secs)} MB/s), saved`);
    fileStatus.textContent = 'done';
    button.disabled = false;
  }
  addEventListener('pagehide', () => savedUrls.forEach((u) => URL.revokeObjectURL(u)));
}

if (ROLE === 'recv') runReceiver();
else runSender();
