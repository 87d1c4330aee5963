import { defineConfig } from '@playwright/test';
import base from './playwright.config';

// Benchmarks, not tests: `scripts/bench-transfer`. Same server as the tests, unless
// BENCH_BASE_URL points the transfer benchmark at a server that is already running.
export default defineConfig({
  ...base,
  testDir: './bench',
  testMatch: '**/*.bench.ts',
  timeout: 900_000,
  webServer: process.env.BENCH_BASE_URL ? undefined : base.webServer,
});
