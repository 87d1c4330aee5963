import { defineConfig } from '@playwright/test';
import base from './playwright.config';

// Benchmarks, not tests: `scripts/bench-transfer`. Same server as the tests.
export default defineConfig({
  ...base,
  testDir: './bench',
  testMatch: '**/*.bench.ts',
  timeout: 900_000,
});
