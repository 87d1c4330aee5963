// The receiver's storage worker: loads the app's WASM (the same package the page hydrates with)
// and runs its sink (src/client/worker.rs), which writes received files to OPFS off the page's
// main thread.
import init, { sink_worker } from '/pkg/beamdrop.js';

await init({ module_or_path: '/pkg/beamdrop.wasm' });
sink_worker();
