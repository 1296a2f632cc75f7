"""A real browser: :func:`browser_check` opens a page in headless Chromium and reports images
that did not load and links that lead nowhere (the tests' check of the report page, and of a
``snakemake --report``)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

_PROBE = """<script>
(function () {
  function load(src) {  // resolves true when the browser decodes the image
    return new Promise(function (resolve) {
      var im = new Image();
      im.onload = function () { resolve(im.naturalWidth > 0 && im.naturalHeight > 0); };
      im.onerror = function () { resolve(false); };
      im.src = src;
    });
  }
  function decode(uri) {  // the text of a base64 data URI, as UTF-8
    var b = atob(uri.slice(uri.indexOf(',') + 1));
    var bytes = new Uint8Array(b.length);
    for (var i = 0; i < b.length; i++) bytes[i] = b.charCodeAt(i);
    return new TextDecoder('utf-8').decode(bytes);
  }
  window.addEventListener('load', function () {
    setTimeout(function () {
      var imgs = Array.prototype.slice.call(document.images);
      var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); });
      var links = Array.prototype.slice.call(document.querySelectorAll('a[href]')).map(function (a) {
        return a.getAttribute('href'); });
      var badAnchors = links.filter(function (h) {
        return h.charAt(0) === '#' && h.length > 1 && !document.getElementById(decodeURIComponent(h.slice(1))); });
      var out = {images: imgs.length, loaded: imgs.length - broken.length,
        broken: broken.map(function (i) { return i.alt || i.src.slice(0, 60); }),
        sizes: imgs.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
        links: links, broken_anchors: badAnchors, title: document.title,
        text: (document.body.innerText || '').slice(0, 4000)};
      var jobs = [];
      // a Snakemake report (`var results = {...}`): every embedded result, and the images inside
      // embedded HTML pages
      var res = window.results;
      if (res && typeof res === 'object') {
        out.report_results = 0; out.report_images = 0; out.report_pages = 0; out.report_broken = [];
        Object.keys(res).forEach(function (key) {
          var uri = res[key] && res[key].data_uri;
          if (!uri) return;
          out.report_results += 1;
          if (uri.indexOf('data:image/') === 0) {
            out.report_images += 1;
            jobs.push(load(uri).then(function (ok) { if (!ok) out.report_broken.push(key); }));
          } else if (uri.indexOf('data:text/html') === 0) {
            out.report_pages += 1;
            var doc = new DOMParser().parseFromString(decode(uri), 'text/html');
            Array.prototype.forEach.call(doc.images, function (im) {
              out.report_images += 1;
              jobs.push(load(im.getAttribute('src')).then(function (ok) {
                if (!ok) out.report_broken.push(key + ' > ' + (im.alt || 'img')); }));
            });
          }
        });
      }
      Promise.all(jobs).then(function () {
        if (out.report_images !== undefined) out.report_loaded = out.report_images - out.report_broken.length;
        var pre = document.createElement('pre');
        pre.id = 'haven-browser-check';
        pre.textContent = JSON.stringify(out);
        document.body.appendChild(pre);
      });
    }, %(delay)d);
  });
})();
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("HAVEN_CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def browser_check(page: str | Path, chromium: str | None = None, timeout: float = 120, delay_ms: int = 1000) -> dict:
    """Open ``page`` in headless Chromium and report what a reader would see broken.

    A copy of the page with a probe script appended is loaded from a temporary folder next to the
    original (so relative links resolve the same). After the load event the probe lists every
    ``<img>`` that did not decode (``naturalWidth == 0``) and every ``#anchor`` link without a
    target; relative file links are checked on disk. Returns ``{"images", "loaded", "broken",
    "sizes", "links", "broken_anchors", "broken_files", "external_links", "title", "text"}``.
    On a ``snakemake --report`` page (a script app that renders results on demand) the probe also
    decodes every embedded result: ``report_results``, ``report_pages`` (embedded HTML pages),
    ``report_images`` (images, including those inside the pages), ``report_loaded`` and
    ``report_broken``. Raises ``FileNotFoundError`` when no Chromium is installed
    (``apt-get install -y chromium``).
    """
    page = Path(page).resolve()
    exe = chromium or find_chromium()
    if not exe:
        raise FileNotFoundError("no chromium found (apt-get install -y chromium, or set HAVEN_CHROMIUM)")
    # after </html> on purpose: a "</body>" may sit inside a script's string literal
    text = page.read_text(encoding="utf-8", errors="replace") + _PROBE % {"delay": delay_ms}
    with tempfile.TemporaryDirectory(prefix=".haven-check-", dir=page.parent) as tmp, \
            tempfile.TemporaryDirectory(prefix="haven-chromium-") as profile:
        copy = Path(tmp) / page.name
        copy.write_text(text, encoding="utf-8")
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--no-first-run", "--mute-audio",
               f"--user-data-dir={profile}", f"--virtual-time-budget={max(10000, 4 * delay_ms)}",
               "--run-all-compositor-stages-before-draw", "--dump-dom", copy.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="haven-browser-check">(.*?)</pre>', proc.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium did not run the page check (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(html.unescape(m.group(1)))
    files = [h for h in result["links"] if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", h, re.I)]
    result["broken_files"] = [h for h in files if not (page.parent / h.split("#")[0].split("?")[0]).exists()]
    result["external_links"] = [h for h in result["links"] if re.match(r"^(https?:)?//", h, re.I)]
    return result
