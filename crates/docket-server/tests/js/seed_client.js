// The client code of seed 003 (RetryFailedTaskCommand), run against a real
// Docket server by tests/server/node.rs. The seed's classes and functions
// below are copied unchanged except for the base URL of `fetch`
// ('/api/bpm/cmd' → BASE_URL + '/api/bpm/cmd'). The seed uses
// retryFailedTask, getProcessState and skipFailedTask as free functions
// without defining them; they are defined here with the same request as
// RetryManager.retryFailedTask. The server runs with
// --insecure-dev-no-auth on loopback, as the seed's fetch sends no token.

const BASE_URL = process.env.DOCKET_URL;

async function command(cmd, data) {
  return await fetch(BASE_URL + '/api/bpm/cmd', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ cmd, data })
  }).then(r => r.json());
}
async function retryFailedTask(data) { return command('RetryFailedTaskCommand', data); }
async function skipFailedTask(data) { return command('SkipFailedTaskCommand', data); }
async function getProcessState(instanceGuid) { return command('GetProcessStateCommand', { instanceGuid }); }

// ---- seed 003, "1. Exponential Backoff Retry" ----
class RetryManager {
async retryWithBackoff(instanceGuid, maxRetries = 5) {
const delays = [1000, 2000, 5000, 10000, 30000]; // Exponential backoff
for (let attempt = 0; attempt < maxRetries; attempt++) {
// Wait before retry (except first attempt)
if (attempt > 0) {
const delay = delays[attempt - 1];
console.log(`Waiting ${delay}ms before retry attempt ${attempt + 1}`);
await this.sleep(delay);
}
try {
const response = await this.retryFailedTask({
instanceGuid,
updatedVariables: {
retryAttempt: attempt + 1,
retryTimestamp: new Date().toISOString()
},
comment: `Retry attempt ${attempt + 1} of ${maxRetries}`
});
if (response.isSuccessful) {
console.log(`Retry successful on attempt ${attempt + 1}`);
return response;
}
console.warn(`Retry attempt ${attempt + 1} failed:`, response.message);
} catch (error) {
console.error(`Retry attempt ${attempt + 1} error:`, error.message);
}
}
throw new Error(`All ${maxRetries} retry attempts failed`);
}
sleep(ms) {
return new Promise(resolve => setTimeout(resolve, ms));
}
async retryFailedTask(data) {
return await fetch(BASE_URL + '/api/bpm/cmd', {
method: 'POST',
headers: { 'Content-Type': 'application/json' },
body: JSON.stringify({
cmd: 'RetryFailedTaskCommand',
data
})
}).then(r => r.json());
}
}

// ---- seed 003, "2. Retry with Updated Configuration" ----
async function retryWithFallback(instanceGuid, failedTask) {
const state = await getProcessState(instanceGuid);
const variables = state.data.state.variables;
// Try primary endpoint first
if (variables.retryAttempt === undefined || variables.retryAttempt < 2) {
return await retryFailedTask({
instanceGuid,
updatedVariables: {
retryAttempt: (variables.retryAttempt || 0) + 1,
timeout: 15000 // Increase timeout
},
comment: "Retrying with increased timeout"
});
}
// Switch to backup endpoint after 2 failures
if (variables.retryAttempt < 4) {
return await retryFailedTask({
instanceGuid,
updatedVariables: {
apiEndpoint: "https://backup-api.example.com",
retryAttempt: variables.retryAttempt + 1,
timeout: 20000
},
comment: "Switching to backup endpoint"
});
}
// After 4 attempts, give up and skip
console.warn("Max retries exceeded, skipping task");
return await skipFailedTask({
instanceGuid,
comment: "All retry attempts exhausted - manual intervention required"
});
}

// ---- seed 003, "4. Retry with Circuit Breaker Pattern" ----
class CircuitBreaker {
constructor(maxFailures = 3, resetTimeout = 60000) {
this.maxFailures = maxFailures;
this.resetTimeout = resetTimeout;
this.failures = 0;
this.state = "CLOSED"; // CLOSED, OPEN, HALF_OPEN
this.nextAttempt = Date.now();
}
async retry(instanceGuid) {
if (this.state === "OPEN") {
if (Date.now() < this.nextAttempt) {
throw new Error("Circuit breaker is OPEN - retry not allowed yet");
}
// Try to close circuit
this.state = "HALF_OPEN";
}
try {
const response = await retryFailedTask({ instanceGuid });
if (response.isSuccessful) {
// Success - reset circuit breaker
this.failures = 0;
this.state = "CLOSED";
return response;
}
// Task retried but failed again
this.handleFailure();
throw new Error("Retry failed");
} catch (error) {
this.handleFailure();
throw error;
}
}
handleFailure() {
this.failures++;
if (this.failures >= this.maxFailures) {
this.state = "OPEN";
this.nextAttempt = Date.now() + this.resetTimeout;
console.warn(`Circuit breaker OPEN until ${new Date(this.nextAttempt)}`);
}
}
reset() {
this.failures = 0;
this.state = "CLOSED";
}
}

// ---- seed 003, "Best Practices 1. Implement Maximum Retry Limits" ----
const MAX_RETRIES = 5;
async function retryWithLimit(instanceGuid) {
const state = await getProcessState(instanceGuid);
const retryCount = state.data.state.variables.retryCount || 0;
if (retryCount >= MAX_RETRIES) {
throw new Error(`Maximum retry limit (${MAX_RETRIES}) reached`);
}
return await retryFailedTask({
instanceGuid,
updatedVariables: {
retryCount: retryCount + 1,
lastRetryAt: new Date().toISOString()
},
comment: `Retry attempt ${retryCount + 1} of ${MAX_RETRIES}`
});
}

// ---- the test driver: run ids come from the Rust test ----
async function main() {
  const [recoversOnSecond, alwaysFails, breakerOk, limited, fallback] = process.argv.slice(2);
  const out = {};

  // RetryManager: the first retry fails again, the second (after the
  // seed's 1 s backoff) succeeds.
  const rm = new RetryManager();
  const ok = await rm.retryWithBackoff(recoversOnSecond, 3);
  out.backoff = { isSuccessful: ok.isSuccessful, message: ok.message, variables: ok.data.state.variables };

  // CircuitBreaker: repeated failures open it; then it refuses at once.
  const cb = new CircuitBreaker(3, 60000);
  const errors = [];
  for (let i = 0; i < 3; i++) {
    try { await cb.retry(alwaysFails); } catch (e) { errors.push(e.message); }
  }
  out.breaker = { state: cb.state, errors };
  const good = new CircuitBreaker();
  const r = await good.retry(breakerOk);
  out.breakerOk = { state: good.state, failures: good.failures, isSuccessful: r.isSuccessful };

  // retryWithLimit: five retries, then the limit.
  const limits = [];
  for (let i = 0; i < 6; i++) {
    try {
      const res = await retryWithLimit(limited);
      limits.push(res.message);
    } catch (e) { limits.push('threw: ' + e.message); }
  }
  const st = await getProcessState(limited);
  out.limit = { messages: limits, retryCount: st.data.state.variables.retryCount };

  // retryWithFallback: two primary retries, two backup retries, then skip.
  const fb = [];
  for (let i = 0; i < 5; i++) {
    const res = await retryWithFallback(fallback, 'Task');
    fb.push(res.message);
  }
  const fst = await getProcessState(fallback);
  out.fallback = { messages: fb, variables: fst.data.state.variables };

  console.log('RESULT ' + JSON.stringify(out));
}

main().catch(e => { console.error(e); process.exit(1); });
