// The raw baseline's sink (module worker, see raw.js): writes each received frame at its offset
// into one OPFS file through a synchronous access handle. Nothing else: no hashing, no copies.
//
// Messages from the page, in order:
//   {cmd: "open", name}  → create/truncate the file, reply {ok: "open"}
//   ArrayBuffer          → one frame [u32 transfer id BE][u64 offset BE][payload]: write it
//   {cmd: "close"}       → flush and close, reply {ok: "close", written: <payload bytes written>}
// Any failure replies {error}.

const HEADER_LEN = 12;
let handle = null;
let written = 0;

onmessage = async (e) => {
  const msg = e.data;
  try {
    if (msg instanceof ArrayBuffer) {
      const offset = Number(new DataView(msg).getBigUint64(4));
      written += handle.write(new Uint8Array(msg, HEADER_LEN), { at: offset });
    } else if (msg.cmd === 'open') {
      handle?.close();
      handle = null;
      const dir = await navigator.storage.getDirectory();
      const fileHandle = await dir.getFileHandle(msg.name, { create: true });
      handle = await fileHandle.createSyncAccessHandle();
      handle.truncate(0);
      written = 0;
      postMessage({ ok: 'open' });
    } else if (msg.cmd === 'close') {
      handle.flush();
      handle.close();
      handle = null;
      postMessage({ ok: 'close', written });
    }
  } catch (err) {
    postMessage({ error: String(err?.message ?? err) });
  }
};
