// ckptviz Loader: the front end of ckptviz/widget.py. One hand-written ES module, no bundler,
// no network. Python owns every decision: a click sends {do: <method>, ...} and the kernel
// answers with what changed (an action delta, or new row metadata when the Diff changes).
// Only the visible rows are in the DOM, so 10,000 rows scroll as smoothly as 10.

const ACTIONS = ["load", "keep", "reinit", "partial"];
const ACTION_OF_CODE = { l: "load", k: "keep", r: "reinit", p: "partial", s: "skip" };
const STATUSES = ["match", "dtype", "shape", "missing", "unexpected"];
const MARK = { match: "✓", dtype: "≈", shape: "✗", missing: "−", unexpected: "+" };
const ACTION_HELP = {
  load: "copy the checkpoint's tensor into the model (casting the dtype if it differs)",
  keep: "leave the model's current value",
  reinit: "draw a fresh value with the module's own initialiser",
  partial: "copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value",
};
const ROW_HEIGHT = { wide: 28, medium: 28, narrow: 50 };
const VISIBLE_LINES = 16;
const OVERSCAN = 6;

const escapeHtml = (text) =>
  String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const shapeText = (shape) => (shape ? `[${shape.join(", ")}]` : "");
const numberText = (n) => Number(n).toLocaleString("en-US");
const plural = (n, word) => `${numberText(n)} ${word}${n === 1 ? "" : "s"}`;

function bytesText(n) {
  let size = n;
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (size < 1024 || unit === "GiB") {
      return unit === "B" ? `${size} B` : `${size.toFixed(1)} ${unit}`;
    }
    size /= 1024;
  }
  return "";
}

function compactNumber(n) {
  if (n < 10000) return numberText(n);
  const units = [
    [1e9, "G"],
    [1e6, "M"],
    [1e3, "k"],
  ];
  for (const [size, unit] of units) {
    if (n >= size) return `${(n / size).toFixed(n >= 10 * size ? 0 : 1)}${unit}`;
  }
  return numberText(n);
}

function element(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) {
      node.setAttribute(name, value === true ? "" : value);
    }
  }
  for (const child of children) node.append(child);
  return node;
}

/** The rows of a Diff in a module tree: a group line per module, collapsible. */
function buildTree(rows) {
  const root = { path: "", name: "", rows: [], all: [], children: new Map() };
  for (const row of rows) {
    let node = root;
    root.all.push(row.index);
    if (row.module) {
      let path = "";
      for (const part of row.module.split(".")) {
        path = path ? `${path}.${part}` : part;
        if (!node.children.has(part)) {
          node.children.set(part, { path, name: part, rows: [], all: [], children: new Map() });
        }
        node = node.children.get(part);
        node.all.push(row.index);
      }
    }
    node.rows.push(row.index);
  }
  return root;
}

class LoaderView {
  constructor(model, el) {
    this.model = model;
    this.el = el;
    this.rows = [];
    this.codes = "";
    this.counts = {};
    this.gen = 0;
    this.rev = 0;
    this.codeRev = 0;
    this.collapsed = new Set();
    this.filterText = "";
    this.regex = false;
    this.shownStatuses = new Set(STATUSES);
    this.explanations = new Map();
    this.focus = null; // {kind: "row", index} | {kind: "group", path} shown in the details line
    this.moduleTypes = {};
    this.lines = null;
    this.mode = "wide";
    this.pending = new Map(); // request id -> label, for the slow calls (apply, undo, files)
    this.nextRequest = 1;
    this.frame = 0;
    this.build();
    this.listen();
    this.renderInfo();
    this.loadRows();
    this.renderSuggestions();
    this.renderReport();
    this.renderMessages();
    this.renderCode();
    this.send("hello");
  }

  // -- talking to the kernel --------------------------------------------------------------------
  send(method, args = {}) {
    this.model.send({ do: method, ...args });
  }

  request(method, args, label) {
    const id = this.nextRequest++;
    this.pending.set(id, label);
    this.renderBusy();
    this.send(method, { ...args, id });
  }

  onMessage(msg) {
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "actions" && msg.gen === this.gen) {
      if (typeof msg.all === "string" && msg.all.length === this.rows.length) {
        this.codes = msg.all;
      } else if (Array.isArray(msg.changes)) {
        const codes = this.codes.split("");
        for (const [index, code] of msg.changes) codes[index] = code;
        this.codes = codes.join("");
      }
      this.counts = msg.counts || this.counts;
      this.rev += 1;
      this.renderCounters();
      this.renderRows();
      this.renderDetails();
      this.renderCode();
    } else if (msg.type === "explain" && msg.gen === this.gen) {
      this.explanations.set(msg.index, msg.text);
      this.renderDetails();
    } else if (msg.type === "done") {
      this.pending.delete(msg.id);
      this.renderBusy();
    }
  }

  listen() {
    const on = (name, callback) => this.model.on(name, callback);
    on("change:_rows", () => {
      this.loadRows();
      this.renderSuggestions();
    });
    on("change:_info", () => this.renderInfo());
    on("change:_suggestions", () => this.renderSuggestions());
    on("change:_report", () => this.renderReport());
    on("change:error", () => this.renderMessages());
    on("change:notice", () => this.renderMessages());
    on("change:_code", () => {
      this.codeRev = this.rev;
      this.renderCode();
    });
    on("msg:custom", (msg) => this.onMessage(msg));

    this.scroller.addEventListener("scroll", () => this.scheduleRender());
    this.lineBox.addEventListener("click", (event) => this.onTableClick(event));
    this.lineBox.addEventListener("mouseover", (event) => this.onHover(event));
    this.lineBox.addEventListener("focusin", (event) => this.onHover(event));
    this.resizeObserver = new ResizeObserver(() => this.fitWidth());
    this.resizeObserver.observe(this.root);
  }

  destroy() {
    this.resizeObserver?.disconnect();
    cancelAnimationFrame(this.frame);
    clearTimeout(this.filterTimer);
  }

  // -- the skeleton -----------------------------------------------------------------------------
  build() {
    const root = element("div", { class: "ckv ckv-wide" });
    this.root = root;

    this.title = element("div", { class: "ckv-title" });
    this.summary = element("div", { class: "ckv-summary" });
    this.counters = element("div", { class: "ckv-counters", "aria-live": "polite" });
    root.append(element("div", { class: "ckv-head" }, [this.title, this.summary]), this.counters);

    // bulk controls: a status selection and a key filter decide the shown rows
    this.filterInput = element("input", {
      class: "ckv-filter",
      type: "search",
      placeholder: "filter keys…",
      "aria-label": "filter rows by key (substring, or a regular expression)",
    });
    this.regexBox = element("input", { type: "checkbox", class: "ckv-regex-box" });
    const regexLabel = element("label", { class: "ckv-regex", title: "treat the filter as a regular expression" }, [
      this.regexBox,
      element("span", { text: "regex" }),
    ]);
    this.statusChips = element("div", { class: "ckv-chips", role: "group", "aria-label": "statuses shown" });
    this.bulkLabel = element("span", { class: "ckv-bulk-label" });
    this.bulkButtons = element("div", { class: "ckv-seg ckv-bulk", role: "group" });
    for (const action of ACTIONS) {
      this.bulkButtons.append(
        element("button", { class: `ckv-btn ckv-a-${action}`, "data-bulk": action, text: action }),
      );
    }
    const resetButton = element("button", {
      class: "ckv-btn ckv-plain",
      text: "defaults",
      title: "back to the default plan: load what fits, keep the rest",
    });
    this.expandButton = element("button", { class: "ckv-btn ckv-plain", text: "collapse all" });
    root.append(
      element("div", { class: "ckv-toolbar" }, [
        element("div", { class: "ckv-find" }, [this.filterInput, regexLabel]),
        this.statusChips,
      ]),
      element("div", { class: "ckv-toolbar ckv-bulkbar" }, [
        this.bulkLabel,
        this.bulkButtons,
        resetButton,
        this.expandButton,
      ]),
    );

    this.suggestBox = element("div", { class: "ckv-suggest" });
    root.append(this.suggestBox);

    // the table: a sticky column header and a spacer holding only the visible lines
    this.header = element("div", { class: "ckv-colhead" });
    this.spacer = element("div", { class: "ckv-spacer" });
    this.lineBox = element("div", { class: "ckv-lines", role: "rowgroup" });
    this.spacer.append(this.lineBox);
    this.scroller = element("div", { class: "ckv-scroll", role: "table", "aria-label": "checkpoint and model tensors" }, [
      this.header,
      this.spacer,
    ]);
    this.details = element("div", { class: "ckv-details", "aria-live": "polite" });
    root.append(element("div", { class: "ckv-table" }, [this.scroller, this.details]));

    this.errorBox = element("div", { class: "ckv-error", role: "alert" });
    this.noticeBox = element("div", { class: "ckv-notice", role: "status" });
    root.append(this.errorBox, this.noticeBox);

    // apply, undo, code, plan files
    this.applyButton = element("button", { class: "ckv-btn ckv-primary", text: "Apply", title: "apply the plan to the live model (all-or-nothing, verified)" });
    this.undoButton = element("button", { class: "ckv-btn", text: "Undo", title: "put back what the last apply wrote, bit for bit" });
    this.codeButton = element("button", { class: "ckv-btn", text: "Code", title: "show the plan as plain PyTorch code" });
    this.pathInput = element("input", { class: "ckv-path", type: "text", "aria-label": "plan file (JSON)" });
    this.saveButton = element("button", { class: "ckv-btn", text: "Save plan" });
    this.loadButton = element("button", { class: "ckv-btn", text: "Load plan" });
    this.busy = element("span", { class: "ckv-busy", "aria-live": "polite" });
    root.append(
      element("div", { class: "ckv-footer" }, [
        element("div", { class: "ckv-group-buttons" }, [this.applyButton, this.undoButton, this.codeButton, this.busy]),
        element("div", { class: "ckv-group-buttons ckv-files" }, [this.pathInput, this.saveButton, this.loadButton]),
      ]),
    );
    this.reportBox = element("div", { class: "ckv-report" });
    this.codeBox = element("div", { class: "ckv-code" });
    root.append(this.reportBox, this.codeBox);
    this.el.append(root);

    this.filterInput.addEventListener("input", () => {
      clearTimeout(this.filterTimer);
      this.filterTimer = setTimeout(() => this.setFilter(this.filterInput.value), 120);
    });
    this.regexBox.addEventListener("change", () => {
      this.regex = this.regexBox.checked;
      this.setFilter(this.filterInput.value);
    });
    this.statusChips.addEventListener("click", (event) => {
      const chip = event.target.closest("[data-status]");
      if (!chip) return;
      const status = chip.dataset.status;
      if (this.shownStatuses.has(status)) this.shownStatuses.delete(status);
      else this.shownStatuses.add(status);
      this.rebuildLines();
    });
    this.bulkButtons.addEventListener("click", (event) => {
      const button = event.target.closest("[data-bulk]");
      if (!button || button.getAttribute("aria-disabled") === "true") return;
      const args = { action: button.dataset.bulk, filter: this.filterText, regex: this.regex };
      if (this.shownStatuses.size < STATUSES.length) args.statuses = [...this.shownStatuses];
      this.send("set_bulk", args);
    });
    resetButton.addEventListener("click", () => this.send("reset"));
    this.expandButton.addEventListener("click", () => {
      if (this.collapsed.size) this.collapsed.clear();
      else for (const path of this.groupPaths) this.collapsed.add(path);
      this.rebuildLines();
    });
    this.applyButton.addEventListener("click", () => this.request("apply", {}, "applying…"));
    this.undoButton.addEventListener("click", () => this.request("undo", {}, "undoing…"));
    this.codeButton.addEventListener("click", () => {
      if (this.model.get("_code") && this.codeRev === this.rev) {
        this.send("hide_code");
        return;
      }
      // the kernel sends new code only if it differs; if it does not, what is shown is current
      this.codeRev = this.rev;
      this.renderCode();
      this.send("show_code");
    });
    this.saveButton.addEventListener("click", () =>
      this.request("save_plan", { path: this.pathInput.value }, "saving…"),
    );
    this.loadButton.addEventListener("click", () =>
      this.request("load_plan", { path: this.pathInput.value }, "loading…"),
    );
  }

  // -- rows, tree and the visible lines ---------------------------------------------------------
  loadRows() {
    const state = this.model.get("_rows") || {};
    const fields = state.fields || [];
    const at = Object.fromEntries(fields.map((name, i) => [name, i]));
    this.gen = state.gen || 0;
    this.actionOrder = state.actions_order || ACTIONS;
    this.reasons = state.reasons || [];
    this.rows = (state.data || []).map((values, index) => {
      const get = (name) => values[at[name]];
      const key = get("model_key") ?? get("checkpoint_key");
      const place = get("place") ?? key;
      const cut = place.lastIndexOf(".");
      return {
        index,
        key,
        module: cut < 0 ? "" : place.slice(0, cut),
        leaf: cut < 0 ? place : place.slice(cut + 1),
        renamed: Boolean(get("renamed")),
        status: get("status"),
        modelKey: get("model_key"),
        modelShape: get("model_shape"),
        modelDtype: get("model_dtype"),
        modelBytes: get("model_bytes"),
        ckptKey: get("checkpoint_key"),
        ckptShape: get("checkpoint_shape"),
        ckptDtype: get("checkpoint_dtype"),
        ckptBytes: get("checkpoint_bytes"),
        note: get("note"),
        refused: get("refused") || 0,
        tied: get("tied") || [],
      };
    });
    this.codes = state.actions || "";
    this.counts = state.counts || {};
    this.explanations.clear();
    this.focus = null;
    this.tree = buildTree(this.rows);
    this.groupPaths = [];
    const collect = (node) => {
      for (const child of node.children.values()) {
        this.groupPaths.push(child.path);
        collect(child);
      }
    };
    collect(this.tree);
    this.rebuildLines();
    this.renderCounters();
    this.renderDetails();
  }

  /** Why `action` is refused for row `index` ("" if it may apply). */
  refusal(index, action) {
    const refused = this.rows[index].refused;
    if (!refused) return "";
    const code = refused[this.actionOrder.indexOf(action)];
    return code ? this.reasons[code - 1] : "";
  }

  actionOf(index) {
    return ACTION_OF_CODE[this.codes[index]] || "…";
  }

  matcher() {
    const text = this.filterText;
    this.filterInput.classList.remove("ckv-invalid");
    if (!text) return () => true;
    if (this.regex) {
      let pattern;
      try {
        pattern = new RegExp(text);
      } catch {
        this.filterInput.classList.add("ckv-invalid");
        return () => true;
      }
      return (row) =>
        (row.modelKey != null && pattern.test(row.modelKey)) ||
        (row.ckptKey != null && pattern.test(row.ckptKey));
    }
    const needle = text.toLowerCase();
    return (row) =>
      (row.modelKey != null && row.modelKey.toLowerCase().includes(needle)) ||
      (row.ckptKey != null && row.ckptKey.toLowerCase().includes(needle));
  }

  setFilter(text) {
    this.filterText = text;
    this.rebuildLines();
  }

  rebuildLines() {
    const matches = this.matcher();
    const visible = this.rows.map((row) => this.shownStatuses.has(row.status) && matches(row));
    this.visible = visible;
    const lines = [];
    const anyVisible = (node) => node.all.some((i) => visible[i]);
    const walk = (node, depth) => {
      for (const i of node.rows) if (visible[i]) lines.push({ kind: "row", index: i, depth });
      for (const child of node.children.values()) {
        if (!anyVisible(child)) continue;
        // a chain of modules holding nothing but one submodule shows as one group: "encoder.layer"
        let shown = child;
        let label = child.name;
        while (shown.rows.length === 0 && shown.children.size === 1) {
          shown = shown.children.values().next().value;
          label += `.${shown.name}`;
        }
        lines.push({ kind: "group", node: shown, label, depth });
        if (!this.collapsed.has(shown.path)) walk(shown, depth + 1);
      }
    };
    walk(this.tree, 0);
    this.lines = lines;
    this.shownModelRows = visible.reduce((n, v, i) => n + (v && this.rows[i].modelKey != null ? 1 : 0), 0);
    this.renderToolbar();
    this.renderRows();
  }

  scheduleRender() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.renderRows();
    });
  }

  fitWidth() {
    const width = this.root.clientWidth;
    const mode = width < 680 ? "narrow" : width < 1000 ? "medium" : "wide";
    if (mode === this.mode) return;
    this.root.classList.remove(`ckv-${this.mode}`);
    this.mode = mode;
    this.root.classList.add(`ckv-${mode}`);
    this.renderHeader();
    this.renderRows();
  }

  // -- rendering --------------------------------------------------------------------------------
  renderInfo() {
    const info = this.model.get("_info") || {};
    this.title.innerHTML =
      `Load <b>${escapeHtml(info.checkpoint)}</b> into <b>${escapeHtml(info.model)}</b>`;
    this.title.title = info.checkpoint_source || "";
    this.summary.textContent = (info.summary || "").split("\n").join(" · ");
    if (!this.pathInput.value) this.pathInput.value = info.plan_path || "plan.json";
    this.moduleTypes = info.module_types || {};
    this.renderHeader();
    this.renderToolbar();
    this.renderRows();
  }

  renderHeader() {
    const info = this.model.get("_info") || {};
    const side = (label, name, cls) =>
      `<div class="ckv-side-title ${cls}" title="${escapeHtml(name)}">${label} <span>${escapeHtml(name)}</span></div>`;
    const columns = (cls) =>
      ["name", "shape", "dtype", "size"]
        .map((c) => `<div class="ckv-colname ckv-c-${c} ${cls}">${c}</div>`)
        .join("");
    if (this.mode === "narrow") {
      this.header.innerHTML =
        `<div class="ckv-hline">${side("checkpoint", info.checkpoint, "ckv-ck")}<div class="ckv-colname ckv-c-arrow">→</div>${side("model", info.model, "ckv-md")}</div>`;
      return;
    }
    this.header.innerHTML =
      `<div class="ckv-hline ckv-grid">${side("checkpoint", info.checkpoint, "ckv-ck")}<div class="ckv-colname ckv-c-status">status</div>${side("model", info.model, "ckv-md")}<div class="ckv-colname ckv-c-act">action</div></div>` +
      `<div class="ckv-hline ckv-grid ckv-sub">${columns("ckv-ck")}<div class="ckv-colname ckv-c-status"></div>${columns("ckv-md")}<div class="ckv-colname ckv-c-act"></div></div>`;
  }

  renderToolbar() {
    const info = this.model.get("_info") || {};
    const statuses = info.statuses || {};
    this.statusChips.innerHTML = STATUSES.filter((s) => statuses[s])
      .map((s) => {
        const on = this.shownStatuses.has(s);
        return `<button class="ckv-chip ckv-s-${s}" data-status="${s}" aria-pressed="${on}" title="${on ? "hide" : "show"} ${s} rows">${MARK[s]} ${s} <b>${numberText(statuses[s])}</b></button>`;
      })
      .join("");
    const all = this.shownModelRows === this.rows.filter((r) => r.modelKey != null).length;
    this.bulkLabel.textContent = all
      ? `Set all ${numberText(this.shownModelRows)} rows to`
      : `Set the ${numberText(this.shownModelRows)} shown rows to`;
    for (const button of this.bulkButtons.children) {
      button.setAttribute("aria-disabled", String(this.shownModelRows === 0));
      button.title = `${button.dataset.bulk} on every shown row that can take it: ${ACTION_HELP[button.dataset.bulk]}`;
    }
    this.expandButton.textContent = this.collapsed.size ? "expand all" : "collapse all";
  }

  renderCounters() {
    const parts = [];
    for (const action of [...ACTIONS, "skip"]) {
      const [rows, values] = this.counts[action] || [0, 0];
      if (action === "skip" && !rows) continue;
      parts.push(
        `<span class="ckv-counter ckv-a-${action}${rows ? "" : " ckv-zero"}" title="${numberText(rows)} rows, ${numberText(values)} values (parameters and buffers)">` +
          `<b>${action}</b> ${plural(rows, "row")} · ${compactNumber(values)} values</span>`,
      );
    }
    this.counters.innerHTML = parts.join("");
  }

  renderRows() {
    if (!this.lines) return;
    const height = ROW_HEIGHT[this.mode];
    const total = this.lines.length;
    const headerHeight = this.header.offsetHeight;
    this.spacer.style.height = `${total * height}px`;
    this.scroller.style.maxHeight = `${headerHeight + VISIBLE_LINES * height + 2}px`;
    const top = Math.max(0, this.scroller.scrollTop - headerHeight);
    const viewport = this.scroller.clientHeight || VISIBLE_LINES * height;
    const first = Math.max(0, Math.floor(top / height) - OVERSCAN);
    const last = Math.min(total, Math.ceil((top + viewport) / height) + OVERSCAN);
    const active = document.activeElement;
    const refocus =
      active && this.lineBox.contains(active)
        ? `[data-a="${active.dataset.a}"][data-${active.dataset.i !== undefined ? "i" : "g"}="${CSS.escape(active.dataset.i ?? active.dataset.g ?? "")}"]`
        : null;
    let html = "";
    for (let k = first; k < last; k++) {
      const line = this.lines[k];
      html += line.kind === "row" ? this.rowHtml(line, k * height) : this.groupHtml(line, k * height);
    }
    if (!total) {
      html = `<div class="ckv-empty-table">no rows match the filter and the statuses chosen</div>`;
    }
    this.lineBox.innerHTML = html;
    if (refocus) this.lineBox.querySelector(refocus)?.focus({ preventScroll: true });
  }

  sideCells(row, side, depth) {
    const key = side === "ck" ? row.ckptKey : row.modelKey;
    if (key == null) {
      const what = side === "ck" ? "not in the checkpoint" : "not in the model";
      return `<div class="ckv-cell ckv-absent ckv-${side}">${what}</div>`;
    }
    const shape = side === "ck" ? row.ckptShape : row.modelShape;
    const dtype = side === "ck" ? row.ckptDtype : row.modelDtype;
    const bytes = side === "ck" ? row.ckptBytes : row.modelBytes;
    const shown = side === "ck" && row.renamed ? key : row.leaf; // renamed: the full key
    const shapeBad = row.status === "shape";
    const dtypeBad = row.status === "dtype";
    const indent = `style="padding-left:${0.4 + depth * 1.1}em"`;
    const tied = side === "md" && row.tied.length ? `<span class="ckv-tag" title="shares its storage with ${escapeHtml(row.tied.join(", "))}">tied</span>` : "";
    const renamed = side === "ck" && row.renamed ? `<span class="ckv-tag" title="${escapeHtml(row.note)}">renamed</span>` : "";
    const title = escapeHtml(row.note && side === "ck" ? `${key}: ${row.note}` : key);
    return (
      `<div class="ckv-cell ckv-name ckv-${side}" ${indent} title="${title}"><span class="ckv-key">${escapeHtml(shown)}</span>${renamed}${tied}</div>` +
      `<div class="ckv-cell ckv-shape ckv-${side}${shapeBad ? " ckv-bad" : ""}">${shapeBad ? '<span class="ckv-icon" aria-label="shape differs">✗</span>' : ""}${shapeText(shape)}</div>` +
      `<div class="ckv-cell ckv-dtype ckv-${side}${dtypeBad ? " ckv-warn" : ""}">${dtypeBad ? '<span class="ckv-icon" aria-label="dtype differs">≈</span>' : ""}${escapeHtml(dtype)}</div>` +
      `<div class="ckv-cell ckv-size ckv-${side}">${bytesText(bytes)}</div>`
    );
  }

  rowButtons(row) {
    if (row.modelKey == null) {
      return `<div class="ckv-cell ckv-act"><span class="ckv-skip" title="${escapeHtml(this.refusal(row.index, "load"))}">skip · never applied</span></div>`;
    }
    const current = this.actionOf(row.index);
    const buttons = ACTIONS.map((action) => {
      const why = this.refusal(row.index, action);
      const title = why ? `${action} is not possible: ${why}` : `${action}: ${ACTION_HELP[action]}`;
      return `<button class="ckv-btn ckv-a-${action}" data-i="${row.index}" data-a="${action}" aria-pressed="${current === action}" aria-disabled="${Boolean(why)}" title="${escapeHtml(title)}">${action}</button>`;
    }).join("");
    return `<div class="ckv-cell ckv-act"><div class="ckv-seg" role="radiogroup" aria-label="action for ${escapeHtml(row.key)}">${buttons}</div></div>`;
  }

  rowHtml(line, top) {
    const row = this.rows[line.index];
    const badge = `<span class="ckv-badge ckv-s-${row.status}">${MARK[row.status]} ${row.status}</span>`;
    const focused = this.focus?.kind === "row" && this.focus.index === row.index ? " ckv-focused" : "";
    const open = `<div class="ckv-line ckv-row ckv-grid ckv-row-${row.status}${focused}" role="row" data-row="${row.index}" data-key="${escapeHtml(row.key)}" style="top:${top}px">`;
    if (this.mode === "narrow") {
      const shapeClass = row.status === "shape" ? "ckv-bad" : "";
      const dtypeClass = row.status === "dtype" ? "ckv-warn" : "";
      const side = (key, shape, dtype, what) =>
        key == null
          ? `<span class="ckv-absent-text">${what}</span>`
          : `<span class="${shapeClass}">${shapeText(shape)}</span> <span class="${dtypeClass}">${escapeHtml(dtype)}</span>`;
      return (
        open +
        `<div class="ckv-cell ckv-status">${badge}</div>` +
        `<div class="ckv-cell ckv-name" style="padding-left:${0.4 + line.depth * 0.8}em" title="${escapeHtml(row.key)}">${escapeHtml(row.leaf)}</div>` +
        this.rowButtons(row) +
        `<div class="ckv-cell ckv-pair">${side(row.ckptKey, row.ckptShape, row.ckptDtype, "not in the checkpoint")} → ${side(row.modelKey, row.modelShape, row.modelDtype, "not in the model")}</div>` +
        `</div>`
      );
    }
    return (
      open +
      this.sideCells(row, "ck", line.depth) +
      `<div class="ckv-cell ckv-status">${badge}</div>` +
      this.sideCells(row, "md", line.depth) +
      this.rowButtons(row) +
      `</div>`
    );
  }

  groupSummary(node) {
    const statuses = {};
    const actions = {};
    const refused = {};
    let modelRows = 0;
    for (const i of node.all) {
      const row = this.rows[i];
      statuses[row.status] = (statuses[row.status] || 0) + 1;
      if (row.modelKey == null) continue;
      modelRows += 1;
      const action = this.actionOf(i);
      actions[action] = (actions[action] || 0) + 1;
      for (const a of ACTIONS) {
        const why = this.refusal(i, a);
        if (why) (refused[a] ||= []).push(`${row.key}: ${why}`);
      }
    }
    return { statuses, actions, refused, modelRows };
  }

  groupHtml(line, top) {
    const node = line.node;
    const { statuses, actions, refused, modelRows } = this.groupSummary(node);
    const open = !this.collapsed.has(node.path);
    const type = this.moduleTypes[node.path] || "";
    const statusText = STATUSES.filter((s) => statuses[s])
      .map((s) => `<span class="ckv-mini ckv-s-${s}">${MARK[s]} ${statuses[s]} ${s}</span>`)
      .join(" ");
    const buttons = ACTIONS.map((action) => {
      const count = actions[action] || 0;
      const cannot = refused[action] || [];
      const none = cannot.length === modelRows;
      const pressed = modelRows > 0 && count === modelRows ? "true" : count ? "mixed" : "false";
      let title = none
        ? `${action} is not possible for any tensor under ${node.path}: ${cannot[0] || "no model tensors here"}`
        : `${action} on the ${modelRows - cannot.length} tensors under ${node.path} that can take it`;
      if (!none && cannot.length) title += `; ${cannot.length} cannot: ${cannot.slice(0, 3).join("; ")}`;
      return `<button class="ckv-btn ckv-a-${action}" data-g="${escapeHtml(node.path)}" data-a="${action}" aria-pressed="${pressed}" aria-disabled="${none}" title="${escapeHtml(title)}">${action}</button>`;
    }).join("");
    const focused = this.focus?.kind === "group" && this.focus.path === node.path ? " ckv-focused" : "";
    const controls = modelRows
      ? `<div class="ckv-seg" role="group" aria-label="action for every tensor under ${escapeHtml(node.path)}">${buttons}</div>`
      : `<span class="ckv-skip" title="the model has no tensors here: these checkpoint entries are never applied">skip · never applied</span>`;
    return (
      `<div class="ckv-line ckv-group ckv-grid${focused}" role="row" data-group="${escapeHtml(node.path)}" style="top:${top}px">` +
      `<div class="ckv-cell ckv-glabel" style="padding-left:${0.2 + line.depth * 1.1}em">` +
      `<button class="ckv-twisty" data-toggle="${escapeHtml(node.path)}" aria-expanded="${open}" title="${open ? "collapse" : "expand"} ${escapeHtml(node.path)}">${open ? "▾" : "▸"}</button>` +
      `<span class="ckv-gname" title="${escapeHtml(node.path)}">${escapeHtml(line.label)}</span>` +
      (type ? `<span class="ckv-gtype">${escapeHtml(type)}</span>` : "") +
      `<span class="ckv-gmeta">${plural(node.all.length, "tensor")} ${statusText}</span></div>` +
      `<div class="ckv-cell ckv-act">${controls}</div>` +
      `</div>`
    );
  }

  onTableClick(event) {
    const toggle = event.target.closest("[data-toggle]");
    if (toggle) {
      const path = toggle.dataset.toggle;
      if (this.collapsed.has(path)) this.collapsed.delete(path);
      else this.collapsed.add(path);
      this.rebuildLines();
      return;
    }
    const button = event.target.closest("button[data-a]");
    if (!button) return;
    if (button.getAttribute("aria-disabled") === "true") {
      this.details.innerHTML = `<span class="ckv-refused">${escapeHtml(button.title)}</span>`;
      return;
    }
    const action = button.dataset.a;
    if (button.dataset.i !== undefined) {
      const row = this.rows[Number(button.dataset.i)];
      this.send("set_action", { pattern: row.modelKey, action });
    } else {
      this.send("set_module", { module: button.dataset.g, action });
    }
  }

  onHover(event) {
    const line = event.target.closest(".ckv-line");
    if (!line) return;
    const focus =
      line.dataset.row !== undefined
        ? { kind: "row", index: Number(line.dataset.row) }
        : { kind: "group", path: line.dataset.group };
    if (this.focus && this.focus.kind === focus.kind && this.focus.index === focus.index && this.focus.path === focus.path) return;
    this.focus = focus;
    for (const old of this.lineBox.querySelectorAll(".ckv-focused")) old.classList.remove("ckv-focused");
    line.classList.add("ckv-focused");
    if (focus.kind === "row" && !this.explanations.has(focus.index)) {
      this.send("explain", { index: focus.index, gen: this.gen });
    }
    this.renderDetails();
  }

  renderDetails() {
    const focus = this.focus;
    if (!focus) {
      this.details.innerHTML = `<span class="ckv-hint">Point at a row for what its status means and what each action would do.</span>`;
      return;
    }
    if (focus.kind === "group") {
      const node = this.findNode(focus.path);
      if (!node) return;
      const { statuses, actions } = this.groupSummary(node);
      const st = STATUSES.filter((s) => statuses[s]).map((s) => `${statuses[s]} ${s}`).join(", ");
      const ac = [...ACTIONS, "skip"].filter((a) => actions[a]).map((a) => `${actions[a]} ${a}`).join(", ");
      this.details.innerHTML =
        `<b>${escapeHtml(focus.path)}</b> ${escapeHtml(this.moduleTypes[focus.path] || "")}: ${node.all.length} tensors (${st}); now ${ac || "nothing to apply"}. ` +
        `The buttons on this line set every tensor under it that can take the action.`;
      return;
    }
    const row = this.rows[focus.index];
    if (!row) return;
    const text = this.explanations.get(focus.index);
    const refused = ACTIONS.map((a) => [a, this.refusal(row.index, a)]).filter(([, why]) => why && row.modelKey != null);
    const refusedHtml = refused.length
      ? `<div class="ckv-refused">${refused.map(([a, why]) => `<b>${a}</b> not possible: ${escapeHtml(why)}`).join(" · ")}</div>`
      : "";
    this.details.innerHTML =
      `<span class="ckv-badge ckv-s-${row.status}">${MARK[row.status]} ${row.status}</span> <b>${escapeHtml(row.key)}</b> ` +
      `<span class="ckv-now">action: ${this.actionOf(row.index)}</span> ` +
      `<span class="ckv-explain">${text === undefined ? "…" : escapeHtml(text)}</span>${refusedHtml}`;
  }

  findNode(path) {
    let node = this.tree;
    for (const part of path.split(".")) {
      node = node?.children.get(part);
    }
    return node;
  }

  renderSuggestions() {
    const items = this.model.get("_suggestions") || [];
    const missing = this.rows.filter((r) => r.status === "missing");
    const unexpected = this.rows.filter((r) => r.status === "unexpected");
    if (!items.length && !(missing.length && unexpected.length)) {
      this.suggestBox.replaceChildren();
      this.suggestBox.hidden = true;
      return;
    }
    this.suggestBox.hidden = false;
    const list = element("ul", { class: "ckv-suggestions" });
    items.forEach((item, index) => {
      const text =
        item.kind === "rule"
          ? `rename rule <code>${escapeHtml(item.pattern)}</code> → <code>${escapeHtml(item.replacement)}</code> pairs ${item.pairs} keys`
          : `checkpoint <code>${escapeHtml(item.checkpoint_key)}</code> → model <code>${escapeHtml(item.model_key)}</code> <span class="ckv-dim">(${escapeHtml(item.reason)})</span>`;
      const button = element("button", { class: "ckv-btn", text: "accept", "data-accept": String(index) });
      const li = element("li");
      li.innerHTML = text + " ";
      li.append(button);
      list.append(li);
    });
    const children = [element("div", { class: "ckv-suggest-title", text: "Renamed keys?" })];
    if (items.length) children.push(list);
    if (missing.length && unexpected.length) {
      const pickModel = element("select", { "aria-label": "missing model key" });
      for (const r of missing) pickModel.append(element("option", { value: r.modelKey, text: r.modelKey }));
      const pickCkpt = element("select", { "aria-label": "unexpected checkpoint key" });
      for (const r of unexpected) pickCkpt.append(element("option", { value: r.ckptKey, text: r.ckptKey }));
      const pairButton = element("button", { class: "ckv-btn", text: "pair" });
      pairButton.addEventListener("click", () =>
        this.send("pair", { model_key: pickModel.value, checkpoint_key: pickCkpt.value }),
      );
      children.push(
        element("div", { class: "ckv-pair-hand" }, [
          element("span", { text: "pair by hand: checkpoint " }),
          pickCkpt,
          element("span", { text: " feeds model " }),
          pickModel,
          pairButton,
        ]),
      );
    }
    this.suggestBox.replaceChildren(...children);
    list.addEventListener("click", (event) => {
      const button = event.target.closest("[data-accept]");
      if (button) this.send("accept", { which: Number(button.dataset.accept) });
    });
  }

  renderReport() {
    const report = this.model.get("_report") || {};
    this.undoButton.disabled = !report.can_undo;
    if (!report.summary) {
      this.reportBox.replaceChildren();
      this.reportBox.hidden = true;
      return;
    }
    this.reportBox.hidden = false;
    const state = report.undone
      ? `<span class="ckv-badge ckv-undone">↶ undone</span>`
      : report.verified
        ? `<span class="ckv-badge ckv-s-match">✓ applied and verified</span>`
        : `<span class="ckv-badge ckv-s-shape">✗ NOT verified</span>`;
    const parts = ACTIONS.filter((a) => report.counts[a]?.rows).map((a) => {
      const c = report.counts[a];
      const keys = report.keys[a] || [];
      const more = c.rows > keys.length ? ` and ${numberText(c.rows - keys.length)} more` : "";
      return `<li><span class="ckv-counter ckv-a-${a}"><b>${a}</b> ${numberText(c.rows)}</span> ${numberText(c.numel)} values, ${bytesText(c.bytes)}: <code>${keys.map(escapeHtml).join("</code>, <code>")}</code>${more}</li>`;
    });
    const notes = (report.notes || []).map((n) => `<div class="ckv-dim">note: ${escapeHtml(n)}</div>`).join("");
    this.reportBox.innerHTML =
      `<div class="ckv-report-head">${state} <span>${escapeHtml(report.summary)}</span></div><ul>${parts.join("")}</ul>${notes}`;
  }

  renderMessages() {
    const error = this.model.get("error");
    const notice = this.model.get("notice");
    this.errorBox.textContent = error || "";
    this.errorBox.hidden = !error;
    this.noticeBox.textContent = notice || "";
    this.noticeBox.hidden = !notice;
    if (error) {
      this.pending.clear();
      this.renderBusy();
    }
  }

  renderBusy() {
    const labels = [...this.pending.values()];
    this.busy.textContent = labels.length ? labels[labels.length - 1] : "";
    this.applyButton.disabled = labels.length > 0;
  }

  renderCode() {
    const code = this.model.get("_code");
    this.codeButton.setAttribute("aria-pressed", String(Boolean(code) && this.codeRev === this.rev));
    if (!code) {
      this.codeBox.replaceChildren();
      this.codeBox.hidden = true;
      return;
    }
    this.codeBox.hidden = false;
    const stale = this.codeRev !== this.rev;
    const copy = element("button", { class: "ckv-btn", text: "copy" });
    const pre = element("pre", {}, [element("code", { text: code })]);
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code);
        copy.textContent = "copied ✓";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(pre);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        copy.textContent = "selected: press Ctrl+C";
      }
    });
    const head = element("div", { class: "ckv-code-head" }, [
      element("span", {
        text: stale
          ? "The plan changed since: press Code again for the current code."
          : "Plain PyTorch that does what Apply does (paste it into a cell, with model in scope):",
        class: stale ? "ckv-stale" : "",
      }),
      copy,
    ]);
    this.codeBox.replaceChildren(head, pre);
  }
}

export default {
  render({ model, el }) {
    const view = new LoaderView(model, el);
    return () => view.destroy();
  },
};
