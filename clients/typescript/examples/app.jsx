// The seed's React page on Docket: runs listed live, a failed run's error
// with Retrigger, Cancel while it runs, and a trigger.

import { createRoot } from 'react-dom/client';
import { DocketClient } from '@docket/client';
import { DocketProvider, useRun, useRuns, useRunActions, useTrigger } from '@docket/client/react';

const token = new URLSearchParams(location.search).get('token') ?? undefined;
const client = new DocketClient({ url: location.origin, token });

function FailedRunActions({ runId }) {
  const { retrigger, cancel, retry } = useRunActions();
  const { status, error, progress } = useRun(runId);
  if (status === 'failed') {
    return (
      <span>
        <span className="error">Failed: {error}</span>
        <button onClick={() => retry(runId, { comment: 'retried from the example page' })}>Retry</button>
        <button onClick={async () => console.log(`New run: ${await retrigger(runId)}`)}>Retrigger</button>
      </span>
    );
  }
  if (status === 'completed' || status === 'cancelled') {
    return <button onClick={() => retrigger(runId)}>Retrigger</button>;
  }
  return (
    <span>
      {progress && <progress value={progress.current} max={progress.total ?? 1} />}
      <button onClick={() => cancel(runId)}>Cancel</button>
    </span>
  );
}

function ImportForm() {
  const { trigger, status, isTriggering, error } = useTrigger('import-csv');
  return (
    <p>
      <button disabled={isTriggering} onClick={() => trigger({ filename: `data-${Date.now()}.csv` })}>Import a CSV</button>
      <button onClick={() => trigger({ filename: 'broken.txt' })}>Import a broken file</button>{' '}
      {status && <span>last import: {status}</span>} {error && <span className="error">{error}</span>}
    </p>
  );
}

function Runs() {
  const { runs, needsAttention, isLoading } = useRuns({ job: 'import-csv', limit: 20 });
  if (isLoading) return <p>Loading…</p>;
  return (
    <>
      <p>{needsAttention.length} run(s) need attention.</p>
      <table>
        <tbody>
          {runs.map((r) => (
            <tr key={r.id}>
              <td>{r.input.filename}</td>
              <td>{r.status}</td>
              <td>attempt {r.attempt}</td>
              <td>
                <FailedRunActions runId={r.id} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </>
  );
}

createRoot(document.getElementById('root')).render(
  <DocketProvider client={client}>
    <h1>CSV imports</h1>
    <ImportForm />
    <Runs />
  </DocketProvider>,
);
