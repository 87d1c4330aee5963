import { defineConfig } from '@playwright/test';

// The server under test: the release binary built by `cargo leptos build --release`,
// on its own port so a running dev server does not interfere.
export const PORT = Number(process.env.E2E_PORT ?? 3100);
export const BASE_URL = `http://127.0.0.1:${PORT}`;

export default defineConfig({
  testDir: './tests',
  timeout: 180_000,
  expect: { timeout: 30_000 },
  fullyParallel: false,
  workers: 1,
  retries: 0,
  reporter: [['list']],
  use: { baseURL: BASE_URL },
  webServer: {
    command: `target/release/beamdrop --listen 127.0.0.1:${PORT}`,
    cwd: '..',
    url: `${BASE_URL}/healthz`,
    reuseExistingServer: false,
    timeout: 60_000,
    stdout: 'ignore',
    stderr: 'pipe',
    env: {
      LEPTOS_SITE_ROOT: 'target/site',
      LEPTOS_SITE_PKG_DIR: 'pkg',
      LEPTOS_ENV: 'PROD',
      RUST_LOG: 'warn',
    },
  },
});
