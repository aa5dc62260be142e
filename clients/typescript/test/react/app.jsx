// The page the browser test drives: every hook of @docket/client/react
// against a real server (through the test's same-origin proxy).

import { useState } from 'react';
import { createRoot } from 'react-dom/client';
import { DocketClient } from '@docket/client';
import { DocketProvider, useRun, useRuns, useRunActions, useTrigger } from '@docket/client/react';

const params = new URLSearchParams(location.search);
const client = new DocketClient({ url: location.origin, token: params.get('token') });

function Trigger() {
  const t = useTrigger('fail-then-succeed');
  return (
    <section id="trigger" data-status={t.status ?? 'none'}>
      <button id="trigger-ok" onClick={() => t.trigger({ failures: 0 }, { idempotencyKey: 'page-ok' })}>Run</button>
      <button id="trigger-bad" onClick={() => t.trigger({ failures: 1, class: 'permanent' })}>Run (fails once)</button>
      <button id="reset" onClick={t.reset}>Reset</button>
      <span id="trigger-run">{t.runId ?? ''}</span>
      <span id="trigger-existing">{String(t.existing)}</span>
      <span id="trigger-error">{t.error ?? ''}</span>
      <span id="trigger-output">{t.isCompleted ? JSON.stringify(t.output) : ''}</span>
    </section>
  );
}

function Refused() {
  const t = useTrigger('no-such-job');
  return (
    <section id="refused">
      <button id="trigger-unknown" onClick={() => t.trigger({}).catch(() => {})}>Run an unknown job</button>
      <span id="refused-run">{t.runId ?? ''}</span>
      <span id="refused-code">{t.triggerError ? t.triggerError.code : ''}</span>
      <span id="refused-error">{t.error ?? ''}</span>
    </section>
  );
}

function Row({ run }) {
  const actions = useRunActions();
  const live = useRun(run.id);
  const [note, setNote] = useState('');
  return (
    <li className="run" data-id={run.id} data-status={run.status} data-live-status={live.status ?? ''}>
      <span className="job">{run.job}</span> <span className="status">{run.status}</span>{' '}
      <span className="attempts">{live.detail ? live.detail.attempts.length : ''}</span>{' '}
      <span className="error">{live.error ?? ''}</span>{' '}
      <span className="progress">{live.progress ? `${live.progress.current}/${live.progress.total}: ${live.progress.message}` : ''}</span>{' '}
      <span className="steps">{live.steps.map((s) => s.name).join(',')}</span>
      {run.status === 'failed' && (
        <button className="retry" onClick={() => actions.retry(run.id, { updatedVariables: { from: 'page' }, comment: 'retried from the page' })}>
          Retry
        </button>
      )}
      {['completed', 'failed', 'cancelled'].includes(run.status) && (
        <button className="retrigger" onClick={async () => setNote(await actions.retrigger(run.id))}>Retrigger</button>
      )}
      {!['completed', 'failed', 'cancelled'].includes(run.status) && (
        <button className="cancel" onClick={() => actions.cancel(run.id)}>Cancel</button>
      )}
      {run.status === 'needs_input' && (
        <button className="approve" onClick={() => actions.approve(run.id, { data: { by: 'page' } })}>Approve</button>
      )}
      <button className="retry-wrong" onClick={() => actions.retry(run.id).catch(() => {})}>Retry (any state)</button>
      <span className="action-error">{actions.error ? actions.error.code : ''}</span>
      <span className="retriggered">{note}</span>
    </li>
  );
}

function Runs() {
  const { runs, needsAttention, isLoading } = useRuns({ limit: 50 });
  return (
    <section id="runs" data-loading={String(isLoading)}>
      <span id="attention">{needsAttention.length}</span>
      <ul>{runs.map((r) => <Row key={r.id} run={r} />)}</ul>
    </section>
  );
}

createRoot(document.getElementById('root')).render(
  <DocketProvider client={client}>
    <Trigger />
    <Refused />
    <Runs />
  </DocketProvider>,
);
