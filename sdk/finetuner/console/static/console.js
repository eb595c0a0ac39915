// The finetuner console: keeps a page up to date while something can still change.
// Every element with data-live="URL" is refreshed from URL (an HTML fragment rendered by the server)
// every data-refresh milliseconds, until the fragment says data-terminal="true". No library, no
// request to anything but the console itself.
'use strict';

(function () {
  const status = document.getElementById('live-status');

  function showStatus(message) {
    if (!status) return;
    status.textContent = message;
    status.hidden = !message;
  }

  function finished(container) {
    return container.querySelector('[data-terminal="true"]') !== null;
  }

  function follow(container) {
    const url = container.dataset.live;
    const every = parseInt(container.dataset.refresh || '2000', 10);
    let last = null;

    async function tick() {
      if (finished(container)) return;
      try {
        const response = await fetch(url, {cache: 'no-store', headers: {Accept: 'text/html'}});
        const text = await response.text();
        if (response.ok) {
          if (text !== last) {
            container.innerHTML = text;
            last = text;
          }
          showStatus('');
        } else {
          showStatus('Updates paused: the console answered ' + response.status + '; retrying.');
        }
      } catch (error) {
        showStatus('Updates paused: the console cannot be reached; retrying.');
      }
      container.dataset.updated = String(Date.now());
      setTimeout(tick, every);
    }

    setTimeout(tick, every);
  }

  document.querySelectorAll('[data-live]').forEach(follow);
  document.querySelectorAll('select[data-autosubmit]').forEach(function (select) {
    select.addEventListener('change', function () { select.form.submit(); });
  });
})();
