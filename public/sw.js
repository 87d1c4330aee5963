// beamdrop's service worker: after one visit the app shell (the send page, /pair, the WASM, JS
// and CSS) opens with the server gone, so two people can still pair by hand (see /pair) and send.
// Network first for everything it keeps (a deploy is picked up at once while the server is up),
// the copy from the last visit when the network fails. Share pages, the WebSocket, server
// functions and the operator's endpoints are never kept.
const CACHE = 'beamdrop-shell-v1';
const SHELL = ['/', '/pair'];
const NEVER = ['/s/', '/ws', '/api/', '/metrics', '/healthz'];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(SHELL))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== 'GET' || url.origin !== self.location.origin) return;
  if (NEVER.some((prefix) => url.pathname.startsWith(prefix))) return;
  event.respondWith(
    fetch(request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          event.waitUntil(caches.open(CACHE).then((cache) => cache.put(request, copy)));
        }
        return response;
      })
      .catch(() =>
        caches.match(request, { ignoreSearch: true }).then((cached) => cached ?? Response.error()),
      ),
  );
});
