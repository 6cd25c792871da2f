// Drives OHIF (served by tools/stack/viewer.py) in Debian's headless Chromium with playwright-core,
// as a radiologist would: open the study, show the view with the heatmap's peak, load our SR, load
// the SEG of that view. Writes screenshots and one JSON of what it saw; asserts nothing (the
// Python test does, tests/integration/test_viewer.py).
//
//   node tests/support/ohif_driver.js PLAN.json
//
// PLAN: {url, outDir, userDataDir, expectedDisplaySets, view: {sopUid, peak: [row, col],
//        outside: [row, col]}, srSeriesNumber, srSopUid, timeoutMs}
// playwright-core comes from .viewer/node_modules (tools/install.sh); the browser is
// /usr/bin/chromium, never a downloaded one.
'use strict';

const fs = require('fs');
const path = require('path');

const ROOT = path.resolve(__dirname, '..', '..');
const { chromium } = require(path.join(ROOT, '.viewer', 'node_modules', 'playwright-core'));

// Chromium on these machines: no sandbox as root, no GPU, WebGL2 through SwiftShader for OHIF's
// cornerstone rendering, and nothing that reaches the network on its own.
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--enable-unsafe-swiftshader',
];

async function waitFor(page, predicate, arg, timeoutMs, what) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: timeoutMs, polling: 250 });
  } catch (err) {
    throw new Error(`timed out waiting for ${what}`);
  }
}

function displaySets(page) {
  return page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map(ds => ({
    uid: ds.displaySetInstanceUID,
    modality: ds.Modality,
    seriesNumber: ds.SeriesNumber,
    description: ds.SeriesDescription || '',
    sopUids: (ds.instances || (ds.instance ? [ds.instance] : [])).map(i => i.SOPInstanceUID),
    referencedDisplaySetUid: ds.referencedDisplaySetInstanceUID || null,
    // why OHIF flags a series it cannot display (the warning sign on its thumbnail)
    messages: ((ds.messages && ds.messages.messages) || []).map(m => m.id !== undefined ? String(m.id) : String(m)),
    unsupported: Boolean(ds.unsupported),
  })));
}

// What is on screen of each text on the page. The study browser cuts a long series description
// with an ellipsis (CSS), and innerText still has it whole: the part shown is the longest prefix
// that ends left of the nearest clipping box (less the ellipsis when the text is cut).
function shownTexts() {
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    if (!text || !text.trim() || !node.parentElement) continue;
    let clip = Infinity;
    for (let el = node.parentElement; el && el !== document.body; el = el.parentElement) {
      if (getComputedStyle(el).overflowX !== 'visible') {
        clip = Math.min(clip, el.getBoundingClientRect().right);
      }
    }
    const range = document.createRange();
    range.selectNodeContents(node);
    if (range.getBoundingClientRect().width === 0) continue;
    const cut = range.getBoundingClientRect().right > clip + 0.5;
    const edge = cut ? clip - 12 : Infinity;  // room for the ellipsis
    let shown = text.length;
    if (cut) {
      shown = 0;
      for (let k = 1; k <= text.length; k++) {
        range.setStart(node, 0);
        range.setEnd(node, k);
        if (range.getBoundingClientRect().right > edge) break;
        shown = k;
      }
    }
    out.push({ text, shown: text.slice(0, shown), cut });
  }
  return out;
}

// Where source pixel (row, col) is on the page now: image -> world -> canvas (CSS px) -> page.
function pageCoordinates(page, points) {
  return page.evaluate(pts => {
    const [enabled] = window.cornerstone.getEnabledElements();
    const viewport = enabled.viewport;
    const imageId = viewport.getCurrentImageId();
    const box = viewport.element.getBoundingClientRect();
    return {
      imageId,
      camera: viewport.getCamera(),
      points: pts.map(([row, col]) => {
        const world = window.cornerstone.utilities.imageToWorldCoords(imageId, [col + 0.5, row + 0.5]);
        const [x, y] = viewport.worldToCanvas(world);
        return [box.left + x, box.top + y];
      }),
    };
  }, points);
}

// A series' thumbnail in the study browser (OHIF ids it by its display set): double-clicking
// it shows that series in the active viewport, as a reader does.
async function dblclickThumbnail(page, displaySetUid) {
  await page.locator(`[id="thumbnail-${displaySetUid}"]`).first().dblclick();
}

async function answerPrompt(page, timeoutMs) {
  const yes = page.getByRole('button', { name: 'Yes', exact: true });
  try {
    await yes.first().waitFor({ state: 'visible', timeout: timeoutMs });
    await yes.first().click();
    return true;
  } catch (err) {
    return false;
  }
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const timeoutMs = plan.timeoutMs || 90000;
  const result = { console: [], pageErrors: [], httpErrors: [], screenshots: {}, steps: [] };
  const context = await chromium.launchPersistentContext(plan.userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  page.on('console', m => {
    if (m.type() === 'error' || m.type() === 'warning') {
      result.console.push(`${m.type()}: ${m.text().split('\n')[0].slice(0, 300)}`);
    }
  });
  page.on('pageerror', e => result.pageErrors.push(e.message.slice(0, 300)));
  page.on('response', r => { if (r.status() >= 400) result.httpErrors.push(`${r.status()} ${r.url()}`); });
  const shot = async name => {
    const file = path.join(plan.outDir, `${name}.png`);
    await page.screenshot({ path: file });
    result.screenshots[name] = file;
  };
  const settle = ms => page.waitForTimeout(ms);
  try {
    // 1. the study: every series listed, the first image drawn
    await page.goto(plan.url);
    await waitFor(page, n => window.services && window.cornerstone &&
      window.services.displaySetService.getActiveDisplaySets().length >= n,
      plan.expectedDisplaySets, timeoutMs, 'the display sets');
    await waitFor(page, () => {
      const [enabled] = window.cornerstone.getEnabledElements();
      return enabled && enabled.viewport.getCurrentImageId && enabled.viewport.getCurrentImageId();
    }, null, timeoutMs, 'an image in the viewport');
    // OHIF's first-visit tour covers the page and takes the clicks: skip it when it comes
    await page.getByText('Skip all').first().click({ timeout: 10000 }).catch(() => {});
    await settle(2000);
    result.displaySets = await displaySets(page);
    await shot('01-study');
    result.steps.push('study');
    const sourceDisplaySet = result.displaySets.find(ds => ds.sopUids.includes(plan.view.sopUid));
    const srDisplaySet = result.displaySets.find(ds => ds.modality === 'SR' &&
      ds.sopUids.includes(plan.srSopUid));
    if (!sourceDisplaySet || !srDisplaySet) throw new Error('the peak image or our SR is not listed');

    // 2. the view with the heatmap's peak, without any overlay
    await dblclickThumbnail(page, sourceDisplaySet.uid);
    await waitFor(page, sop => {
      const [enabled] = window.cornerstone.getEnabledElements();
      return enabled.viewport.getCurrentImageId().includes(sop);
    }, plan.view.sopUid, timeoutMs, `the ${plan.view.label} image`);
    await settle(2500);
    result.imageMapping = await pageCoordinates(page, [plan.view.peak, plan.view.outside]);
    await shot('02-image');
    result.steps.push('image');

    // 3. our TID 1500 SR
    await dblclickThumbnail(page, srDisplaySet.uid);
    // OHIF draws a measurement's label as SVG text over the viewport once the SR is parsed
    // and the referenced image shown; a document without any drawable group shows none.
    const srLabel = () => {
      const pane = document.querySelector('[data-cy="viewport-pane"]');
      return pane && pane.querySelector('svg text');
    };
    // A race in OHIF 3.13: its SR viewport hands the display tool the measurements to draw
    // (setTrackingUniqueIdentifiersForElement) without asking for a redraw, so when the image
    // was drawn before that, no mark shows until the viewport redraws (a reader's next click or
    // scroll does; seen here in about half the runs). Give OHIF 15 s on its own, then ask for an
    // annotation redraw once the SR tool group holds the viewport: OHIF still draws our SR's
    // marks and labels itself. srRedrawn in the result says the nudge was needed.
    await waitFor(page, srLabel, null, 15000, 'a measurement label').catch(async () => {
      result.srRedrawn = true;
      await waitFor(page, () => {
        const [enabled] = window.cornerstone.getEnabledElements();
        if (!enabled) return false;
        const tools = window.cornerstoneTools;
        const group = tools.ToolGroupManager.getToolGroupForViewport(enabled.viewport.id,
          enabled.renderingEngineId);
        if (group && group.id === 'SRToolGroup') {
          tools.utilities.triggerAnnotationRenderForViewportIds([enabled.viewport.id]);
        }
        const pane = document.querySelector('[data-cy="viewport-pane"]');
        return pane && pane.querySelector('svg text');
      }, null, 45000, 'a measurement label');
    }).catch(err => { result.srWait = err.message; });
    await settle(3000);
    result.srText = await page.evaluate(() => document.body.innerText);
    result.shownTexts = await page.evaluate(shownTexts);
    result.srViewportText = await page.evaluate(() => {
      const pane = document.querySelector('[data-cy="viewport-pane"]');
      return pane ? Array.from(pane.querySelectorAll('svg text')).map(t => t.textContent).join('\n') : '';
    });
    await shot('03-sr');
    result.steps.push('sr');
    // OHIF's parse of the SR: one entry per measurement group it can draw (a group without an
    // image region is skipped). Those on the image shown are drawn with their labels above.
    result.srMeasurements = await page.evaluate(uid => {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      return ((ds && ds.measurements) || []).map(m => ({
        trackingIdentifier: m.TrackingIdentifier || '',
        graphicType: m.graphicType || '',
        referencedSopUid: m.ReferencedSOPInstanceUID || '',
        labels: (m.labels || []).map(l => `${l.label}: ${l.value}`),
      }));
    }, srDisplaySet.uid);
    result.srShownImageId = await page.evaluate(() =>
      window.cornerstone.getEnabledElements()[0].viewport.getCurrentImageId());

    // 4. the SEG whose source is the view with the peak, over that view
    const seg = result.displaySets.find(ds => ds.modality === 'SEG' &&
      sourceDisplaySet && ds.referencedDisplaySetUid === sourceDisplaySet.uid);
    result.segDisplaySets = result.displaySets.filter(ds => ds.modality === 'SEG').map(ds => ({
      ...ds,
      referencedSopUids: (result.displaySets.find(o => o.uid === ds.referencedDisplaySetUid) || {}).sopUids || [],
    }));
    if (seg) {
      await dblclickThumbnail(page, sourceDisplaySet.uid);
      await settle(2000);
      await dblclickThumbnail(page, seg.uid);
      result.segPromptAnswered = await answerPrompt(page, 20000);
      await waitFor(page, () => window.services.segmentationService.getSegmentations().length > 0,
        null, timeoutMs, 'the segmentation');
      await settle(5000);
      result.segmentations = await page.evaluate(() =>
        window.services.segmentationService.getSegmentations().map(s => ({
          id: s.segmentationId, label: s.label, segments: Object.keys(s.segments || {}) })));
      result.segMapping = await pageCoordinates(page, [plan.view.peak, plan.view.outside]);
      await shot('04-seg');
      result.steps.push('seg');
    }
  } catch (err) {
    result.error = err.message;
    await shot('99-error').catch(() => {});
  } finally {
    await context.close();
  }
  fs.writeFileSync(path.join(plan.outDir, 'result.json'), JSON.stringify(result, null, 1));
}

main().catch(err => { console.error(err); process.exit(1); });
