// ckptviz Loader: the front end of ckptviz/widget.py. One hand-written ES module, no bundler,
// no network. Python owns every decision: a click sends {do: <method>, ...} and the kernel
// answers with what changed (an action delta, or new row metadata when the Diff changes).
// Only the visible rows are in the DOM, so 10,000 rows scroll as smoothly as 10.
//
// The kernel also sends what this file would otherwise restate: the statuses and actions with
// their words, symbols and colour roles (_vocabulary), and the table's columns (_columns).
//
// Every value from the kernel is data, never markup: keys, shapes, dtypes, notes and file names
// come from a checkpoint someone else made. The DOM is built with createElement and textContent
// only; attribute names, class names and style properties are fixed in this file, and a class
// picked by a value is looked up in the vocabulary first (roleClass). Nothing is parsed as HTML.
// tests/test_loader_js_safety.py holds this file to that.

const ROW_HEIGHT = { wide: 28, medium: 28, narrow: 50 };
const MODE_CLASS = { wide: "ckv-wide", medium: "ckv-medium", narrow: "ckv-narrow" };
const VISIBLE_LINES = 16;
const OVERSCAN = 6;
// the grid track of each width hint a declared column may give (widget_columns.WIDTHS)
const WIDTH_TRACK = { name: "minmax(7em, 1.2fr)", wide: "minmax(8.5em, 0.8fr)", short: "6.6em" };
// a cell standing for a whole absent side spans that side's columns
const SPAN_CLASS = ["ckv-span-1", "ckv-span-1", "ckv-span-2", "ckv-span-3", "ckv-span-4", "ckv-span-5", "ckv-span-6", "ckv-span-7", "ckv-span-8"];
// how a cell of each column kind is drawn (widget_columns.COLUMN_KINDS)
const KIND_CLASS = { key: "ckv-name", shape: "ckv-shape", text: "ckv-text", bytes: "ckv-size" };
const UNKNOWN_TERM = { name: "?", label: "not known to this front end", symbol: "?", colour: "neutral" };
const MAX_DEPTH = 40;

const numberText = (n) => Number(n).toLocaleString("en-US");
// the keys the table handles itself; they never reach the notebook (JupyterLab's command mode)
const GRID_KEYS = new Set(["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "Home", "End", "PageUp", "PageDown", " ", "Enter", "n", "p"]);

// a widget instance's number, for the ids that tie an option's control to its words
let nextWidget = 1;

/** [row index, {option: value}] pairs from the kernel, the malformed ones dropped. */
function optionPairs(list) {
  if (!Array.isArray(list)) return [];
  return list.filter(
    (pair) => Array.isArray(pair) && Number.isInteger(pair[0]) && pair[1] && typeof pair[1] === "object" && !Array.isArray(pair[1]),
  );
}

/** An option's value as words: what the table and the details line show. */
function optionValueText(value) {
  return value === null ? "none" : String(value);
}

/** The rows' values: one UTF-8 JSON buffer from the kernel (a DataView), or a plain list. */
function decodeRows(data) {
  if (Array.isArray(data)) return data;
  if (data instanceof DataView || data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
    try {
      const parsed = JSON.parse(new TextDecoder().decode(data));
      return Array.isArray(parsed) ? parsed : [];
    } catch {
      return [];
    }
  }
  return [];
}

/** `text` cut in the middle to `room` characters, so both ends (a key's module and leaf, a
 * shape's first and last sizes) stay readable; the full text goes in the title and details. */
function middleCut(text, room) {
  if (!(room > 0) || text.length <= room) return text;
  if (room < 5) return `${text.slice(0, Math.max(1, room - 1))}…`;
  const tail = Math.floor((room - 1) / 2);
  return `${text.slice(0, room - 1 - tail)}…${text.slice(text.length - tail)}`;
}
const plural = (n, word) => `${numberText(n)} ${word}${n === 1 ? "" : "s"}`;
const textOf = (value) => (value === null || value === undefined ? "" : String(value));
const keyOf = (value) => (typeof value === "string" ? value : null);

function bytesText(n) {
  let size = Number(n);
  if (!Number.isFinite(size)) return "";
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

/** A column value as the text its kind shows. */
function cellText(kind, value) {
  if (value === null || value === undefined) return "";
  if (kind === "shape") return Array.isArray(value) ? `[${value.map(textOf).join(", ")}]` : textOf(value);
  if (kind === "bytes") return bytesText(value);
  return textOf(value);
}

/** A new element with fixed class names and optional text (set as text, never parsed). */
function make(tag, classes = [], text = undefined) {
  const node = document.createElement(tag);
  for (const name of classes) if (name) node.classList.add(name);
  if (text !== undefined) node.textContent = textOf(text);
  return node;
}

function button(classes, text, title = "") {
  const node = make("button", ["ckv-btn", ...classes], text);
  node.setAttribute("type", "button");
  if (title) node.setAttribute("title", title);
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
    this.collapsed = new Set();
    this.cursor = { line: 0, col: 0 }; // the one cell of the grid that Tab reaches (roving tabindex)
    this.room = new Map(); // column key -> characters its cells show before cutting the middle
    this.filterText = "";
    this.regex = false;
    this.explanations = new Map();
    this.focus = null; // {kind: "row", index} | {kind: "group", path} shown in the details line
    this.rowOptions = new Map(); // row index -> the options that differ from its action's defaults
    this.optionsShown = ""; // what the option controls show now: row, action and options
    this.widgetNumber = nextWidget++;
    this.moduleTypes = {};
    this.lines = null;
    this.mode = "wide";
    this.pending = new Map(); // request id -> label, for the slow calls (apply, undo, files)
    this.nextRequest = 1;
    this.frame = 0;
    this.loadVocabulary();
    this.shownStatuses = new Set(this.statusNames);
    this.loadColumns();
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

  // -- what the kernel declares: vocabulary and columns ----------------------------------------
  loadVocabulary() {
    const vocabulary = this.model.get("_vocabulary") || {};
    const terms = (list) =>
      new Map(
        (Array.isArray(list) ? list : [])
          .filter((t) => t && typeof t.name === "string")
          .map((t) => [t.name, t]),
      );
    this.colours = new Set(Array.isArray(vocabulary.colours) ? vocabulary.colours : []);
    this.statusTerms = terms(vocabulary.statuses);
    this.statusNames = [...this.statusTerms.keys()];
    this.differingStatuses = new Set([...this.statusTerms.values()].filter((t) => t.differs).map((t) => t.name));
    this.actionTerms = terms(vocabulary.actions);
    this.actionNames = [...this.actionTerms.keys()];
    this.chosenActions = this.actionNames.filter((a) => this.actionTerms.get(a).chosen);
    // what a row without a model tensor shows: the one action nobody chooses
    this.skipAction = this.actionNames.find((a) => !this.actionTerms.get(a).chosen) || "";
    // an always-shown action has a button on every row (struck through where refused); the
    // others only where they may apply, so a rare action costs no width on ordinary rows
    this.alwaysShown = new Set(this.chosenActions.filter((a) => this.actionTerms.get(a).always_shown !== false));
    this.actionOfCode = new Map([...this.actionTerms.values()].map((t) => [t.code, t.name]));
    // each action's options as Python declares them (OptionSpec): name, kind, default, choices, words
    const kinds = new Set(["str", "int", "float", "bool"]);
    this.actionOptions = new Map(
      [...this.actionTerms.values()].map((t) => [
        t.name,
        (Array.isArray(t.options) ? t.options : []).filter(
          (o) => o && typeof o.name === "string" && kinds.has(o.kind) && typeof o.words === "string",
        ),
      ]),
    );
  }

  /** Row `index`'s options (every declared one: the chosen value, else the default). */
  optionsOf(index, action = this.actionOf(index)) {
    const chosen = this.rowOptions.get(index) || {};
    return (this.actionOptions.get(action) || []).map((spec) => ({
      spec,
      value: Object.prototype.hasOwnProperty.call(chosen, spec.name) ? chosen[spec.name] : spec.default,
      chosen: Object.prototype.hasOwnProperty.call(chosen, spec.name),
    }));
  }

  /** "partial · mean": the action and the values of its options that are not the defaults. */
  actionWithOptions(index) {
    const action = this.actionOf(index);
    const chosen = this.optionsOf(index, action).filter((o) => o.chosen);
    return [action, ...chosen.map((o) => `${o.spec.name} ${optionValueText(o.value)}`)].join(" · ");
  }

  statusTerm(status) {
    return this.statusTerms.get(status) || UNKNOWN_TERM;
  }

  actionTerm(action) {
    return this.actionTerms.get(action) || UNKNOWN_TERM;
  }

  /** The class that gives an element a colour role's colour: only roles the vocabulary names. */
  roleClass(role) {
    return this.colours.has(role) ? `ckv-role-${role}` : "ckv-role-neutral";
  }

  loadColumns() {
    const declared = this.model.get("_columns") || [];
    // each column keeps its declared position: a row's side lists the values in that order
    this.columns = (Array.isArray(declared) ? declared : [])
      .map((c, at) => ({ ...c, at }))
      .filter((c) => typeof c.key === "string" && typeof c.title === "string");
  }

  /** The declared columns this width shows on each side. */
  sideColumns() {
    if (this.mode === "narrow") return this.columns.filter((c) => c.narrow);
    if (this.mode === "medium") return this.columns.filter((c) => c.medium);
    return this.columns;
  }

  fitColumns() {
    const side = this.sideColumns().map((c) => WIDTH_TRACK[c.width] || WIDTH_TRACK.short);
    const tracks = [...side, "var(--ckv-status-w)", ...side, "var(--ckv-act-track, var(--ckv-act-w))"];
    this.root.style.setProperty("--ckv-cols", tracks.join(" "));
    this.fitActions();
  }

  /** Which actions row `index` shows a button for: the always-shown ones, every other one that
   * may apply to it, and its current action. */
  shownActions(index) {
    const current = this.actionOf(index);
    return this.chosenActions.filter((a) => this.alwaysShown.has(a) || a === current || !this.refusal(index, a));
  }

  /** The set of shown actions of row `index` as bits of `chosenActions` (0: a row without a
   * model tensor, which shows no buttons). */
  actionMask(index) {
    if (this.rows[index].modelKey == null) return 0;
    const current = this.actionOf(index);
    let mask = 0;
    this.chosenActions.forEach((a, bit) => {
      if (this.alwaysShown.has(a) || a === current || !this.refusal(index, a)) mask |= 1 << bit;
    });
    return mask;
  }

  /** Every distinct set of buttons a row or a group line can show (a group shows what any of
   * its rows shows), and each row's own set: what the action column must fit. */
  collectActionMasks() {
    this.rowMasks = new Int32Array(this.rows.length);
    for (let i = 0; i < this.rows.length; i++) this.rowMasks[i] = this.actionMask(i);
    const masks = new Set();
    const walk = (node) => {
      let mask = 0;
      for (const i of node.rows) {
        mask |= this.rowMasks[i];
        if (this.rowMasks[i]) masks.add(this.rowMasks[i]);
      }
      for (const child of node.children.values()) mask |= walk(child);
      // the top of the tree is no line: what all groups together hold is never shown at once
      if (mask && node !== this.tree) masks.add(mask);
      return mask;
    };
    walk(this.tree);
    this.actionMasks = masks;
  }

  /** After a tick: a changed row whose buttons are a set the column was not sized for (its
   * action is one it was not offered) sizes the column again. */
  checkActionMasks(indices) {
    if (!this.rowMasks) return;
    for (const i of indices) {
      if (i < 0 || i >= this.rows.length || this.actionMask(i) === this.rowMasks[i]) continue;
      this.collectActionMasks();
      if (this.fitActions()) this.fitWidth();
      return;
    }
  }

  /** Size the action column to the widest line's buttons: each distinct set laid out once
   * (unpressed), plus what pressing a button adds (bold, its mark) and the widest options mark.
   * Rows keep their fixed height and no button is cut. Unmeasured (not laid out yet): the
   * stylesheet's width stands until the first resize. */
  fitActions() {
    if (!this.actProbe || !this.actionMasks) return false;
    const masks = [...this.actionMasks];
    const segOf = (actions, pressed = "") => {
      const seg = make("div", ["ckv-seg"]);
      for (const a of actions) {
        const b = button([this.roleClass(this.actionTerm(a).colour)], a);
        b.setAttribute("aria-pressed", String(a === pressed));
        seg.append(b);
      }
      return seg;
    };
    const sets = masks.map((mask) => segOf(this.chosenActions.filter((_, bit) => mask & (1 << bit))));
    const plain = this.chosenActions.map((a) => segOf([a]));
    const pressed = this.chosenActions.map((a) => segOf([a], a));
    const never = make("span", ["ckv-never"], `${this.skipAction} · never applied`);
    const marks = [...new Set([...this.rowOptions.keys()].map((i) => this.optionMark(i)))].map((text) => make("span", ["ckv-opt-mark"], text));
    const cell = make("div", ["ckv-cell", "ckv-act"]);
    this.actProbe.replaceChildren(...sets, never, ...plain, ...pressed, ...marks, cell);
    const width = (node) => node.getBoundingClientRect().width;
    const widest = Math.max(0, width(never), ...sets.map(width));
    const pressExtra = Math.max(0, ...plain.map((p, i) => width(pressed[i]) - width(p)));
    const markExtra = Math.max(0, ...marks.map(width));
    const style = getComputedStyle(cell);
    const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight) || 0;
    this.actProbe.replaceChildren();
    if (!widest) return false;
    const need = Math.ceil(widest + pressExtra + markExtra + padding + 2);
    if (need === this.actTrackPx) return false;
    this.actTrackPx = need;
    this.root.style.setProperty("--ckv-act-track", `${need}px`);
    return true;
  }

  /** The narrowest the table can be in `mode` ("wide" or "medium") without scrolling sideways:
   * the smallest size of each column's track, the status and the measured action column. */
  minTableWidth(mode) {
    const columns = mode === "medium" ? this.columns.filter((c) => c.medium) : this.columns;
    const style = getComputedStyle(this.root);
    const em = parseFloat(style.fontSize) || 13;
    const trackEm = (track) => parseFloat(/([\d.]+)em/.exec(track)?.[1] || "0");
    const side = columns.reduce((sum, c) => sum + trackEm(WIDTH_TRACK[c.width] || WIDTH_TRACK.short), 0);
    const status = parseFloat(style.getPropertyValue("--ckv-status-w")) || 9.2;
    // the stylesheet's min-width of the wide and medium column header
    return Math.max(880, (2 * side + status) * em + (this.actTrackPx || 19 * em));
  }

  /** " · mean": the values of row `index`'s chosen options, as its pressed button shows them. */
  optionMark(index) {
    const values = this.optionsOf(index, this.actionOf(index)).filter((o) => o.chosen).map((o) => optionValueText(o.value));
    return ` · ${values.join(", ")}`;
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
        this.collectActionMasks();
      } else if (Array.isArray(msg.changes)) {
        const codes = this.codes.split("");
        for (const [index, code] of msg.changes) codes[index] = code;
        this.codes = codes.join("");
        this.checkActionMasks(msg.changes.map(([index]) => Number(index)));
      }
      if (Array.isArray(msg.options)) {
        if (msg.options_full) this.rowOptions.clear();
        for (const [index, chosen] of optionPairs(msg.options)) {
          if (Object.keys(chosen).length) this.rowOptions.set(index, chosen);
          else this.rowOptions.delete(index);
        }
      }
      // a pressed button's options mark ("· mean") may need a wider column
      if ((typeof msg.all === "string" || Array.isArray(msg.options)) && this.fitActions()) this.fitWidth();
      this.counts = msg.counts || this.counts;
      this.renderCounters();
      this.renderRows();
      this.renderDetails();
      this.renderCode();
    } else if (msg.type === "explain" && msg.gen === this.gen) {
      this.explanations.set(msg.index, textOf(msg.text));
      this.renderDetails();
    } else if (msg.type === "done") {
      this.pending.delete(msg.id);
      this.renderBusy();
      this.renderOptions();
      this.keepFocus();
    } else if (msg.type === "confirm_overwrite" && typeof msg.path === "string") {
      this.askOverwrite(msg.path);
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
    on("change:_report", () => {
      this.renderReport();
      this.renderRows();
    });
    on("change:code_stale", () => this.renderCode());
    on("change:error", () => this.renderMessages());
    on("change:notice", () => this.renderMessages());
    on("change:_code", () => this.renderCode());
    on("msg:custom", (msg) => this.onMessage(msg));

    this.scroller.addEventListener("scroll", () => this.scheduleRender());
    this.lineBox.addEventListener("click", (event) => this.onTableClick(event));
    this.lineBox.addEventListener("mouseover", (event) => this.onHover(event));
    this.lineBox.addEventListener("focusin", (event) => {
      this.onHover(event);
      this.onGridFocus(event);
    });
    this.lineBox.addEventListener("keydown", (event) => this.onGridKey(event));
    this.root.addEventListener("focusin", (event) => {
      this.lastFocus = event.target;
    });
    // keys typed in the widget's own fields are the widget's: JupyterLab must not act on them
    this.root.addEventListener("keydown", (event) => {
      const control = event.target.closest("input, select, button, summary");
      if (!control) return;
      // a field's keys, and Space or Enter on a button (its click), are the widget's
      if (control.matches("input, select") || event.key === " " || event.key === "Enter") event.stopPropagation();
    });
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
    const root = make("div", ["ckv", MODE_CLASS.wide]);
    this.root = root;
    this.fitColumns();

    this.title = make("div", ["ckv-title"]);
    this.summary = make("div", ["ckv-summary"]);
    this.counters = make("div", ["ckv-counters"]);
    this.counters.setAttribute("aria-live", "polite");
    const head = make("div", ["ckv-head"]);
    head.append(this.title, this.summary);
    root.append(head, this.counters);

    // bulk controls: a status selection and a key filter decide the shown rows
    this.filterInput = make("input", ["ckv-filter"]);
    this.filterInput.setAttribute("type", "search");
    this.filterInput.setAttribute("placeholder", "filter keys…");
    this.filterInput.setAttribute("aria-label", "filter rows by key (substring, or a regular expression)");
    this.regexBox = make("input", ["ckv-regex-box"]);
    this.regexBox.setAttribute("type", "checkbox");
    const regexLabel = make("label", ["ckv-regex"]);
    regexLabel.setAttribute("title", "treat the filter as a regular expression");
    regexLabel.append(this.regexBox, make("span", [], "regex"));
    this.statusChips = make("div", ["ckv-chips"]);
    this.statusChips.setAttribute("role", "group");
    this.statusChips.setAttribute("aria-label", "statuses shown");
    this.bulkLabel = make("span", ["ckv-bulk-label"]);
    this.bulkButtons = make("div", ["ckv-seg", "ckv-bulk"]);
    this.bulkButtons.setAttribute("role", "group");
    for (const action of this.chosenActions) {
      const bulk = button([this.roleClass(this.actionTerm(action).colour)], action);
      bulk.setAttribute("data-bulk", action);
      this.bulkButtons.append(bulk);
    }
    const resetButton = button(["ckv-plain"], "defaults", "back to the default plan: load what fits, keep the rest");
    this.expandButton = button(["ckv-plain"], "collapse all");
    const find = make("div", ["ckv-find"]);
    find.append(this.filterInput, regexLabel);
    const toolbar = make("div", ["ckv-toolbar"]);
    toolbar.append(find, this.statusChips);
    const bulkbar = make("div", ["ckv-toolbar", "ckv-bulkbar"]);
    this.prevButton = button([], "↑ previous difference", "the previous row that differs (key p in the table)");
    this.nextButton = button([], "↓ next difference", "the next row that differs (key n in the table)");
    this.diffCount = make("span", ["ckv-dim"]);
    const jumps = make("div", ["ckv-group-buttons", "ckv-jumps"]);
    jumps.append(this.prevButton, this.nextButton, this.diffCount);
    bulkbar.append(this.bulkLabel, this.bulkButtons, resetButton, this.expandButton, jumps);
    root.append(toolbar, bulkbar);

    this.suggestBox = make("div", ["ckv-suggest"]);
    root.append(this.suggestBox);

    // the table: a sticky column header and a spacer holding only the visible lines
    this.header = make("div", ["ckv-colhead"]);
    this.header.setAttribute("role", "rowgroup");
    this.columnLines = make("div", []);
    // where the first line shown sits in the module tree: deep in a big model, the path
    this.pathBar = make("div", ["ckv-path-bar"]);
    this.pathBar.setAttribute("aria-hidden", "true");
    this.header.append(this.columnLines, this.pathBar);
    this.spacer = make("div", ["ckv-spacer"]);
    this.lineBox = make("div", ["ckv-lines"]);
    this.lineBox.setAttribute("role", "rowgroup");
    this.spacer.append(this.lineBox);
    this.scroller = make("div", ["ckv-scroll"]);
    // the ARIA grid pattern: one tab stop, arrow keys move, only the lines in view are in the
    // DOM and each says where it is (aria-rowindex of aria-rowcount)
    this.scroller.setAttribute("role", "grid");
    this.scroller.setAttribute("aria-label", "checkpoint and model tensors: arrow keys move, Space or Enter picks an action, n and p jump to the next and previous difference");
    this.scroller.append(this.header, this.spacer);
    this.probe = make("span", ["ckv-probe"], "0000000000");
    this.probe.setAttribute("aria-hidden", "true");
    root.append(this.probe);
    // the action buttons of every distinct line, laid out unseen to size the action column
    this.actProbe = make("div", ["ckv-act-probe"]);
    this.actProbe.setAttribute("aria-hidden", "true");
    root.append(this.actProbe);
    this.details = make("div", ["ckv-details"]);
    this.details.setAttribute("aria-live", "polite");
    // the options of the pointed row's action: controls, outside the live region (a control
    // announced again at each render would talk over the reader)
    this.optionsBox = make("div", ["ckv-options"]);
    this.optionsBox.setAttribute("role", "group");
    this.optionsBox.hidden = true;
    this.optionsBox.addEventListener("change", (event) => this.onOptionChange(event));
    const table = make("div", ["ckv-table"]);
    table.append(this.scroller, this.details, this.optionsBox);
    root.append(table);

    this.errorBox = make("div", ["ckv-error"]);
    this.errorBox.setAttribute("role", "alert");
    this.confirmBox = make("div", ["ckv-confirm"]);
    this.confirmBox.hidden = true;
    this.noticeBox = make("div", ["ckv-notice"]);
    this.noticeBox.setAttribute("role", "status");
    root.append(this.errorBox, this.confirmBox, this.noticeBox);

    // apply, undo, code, plan files
    this.applyButton = button(["ckv-primary"], "Apply", "apply the plan to the live model (all-or-nothing, verified)");
    this.undoButton = button([], "Undo", "put back what the last apply wrote, bit for bit");
    this.codeButton = button([], "Code", "show the plan as plain PyTorch code");
    this.pathInput = make("input", ["ckv-path"]);
    this.pathInput.setAttribute("type", "text");
    this.pathInput.setAttribute("aria-label", "plan file (JSON), in the plan folder");
    this.saveButton = button([], "Save plan");
    this.loadButton = button([], "Load plan");
    this.busy = make("span", ["ckv-busy"]);
    this.busy.setAttribute("aria-live", "polite");
    const actionsGroup = make("div", ["ckv-group-buttons"]);
    actionsGroup.append(this.applyButton, this.undoButton, this.codeButton, this.busy);
    const filesGroup = make("div", ["ckv-group-buttons", "ckv-files"]);
    filesGroup.append(this.pathInput, this.saveButton, this.loadButton);
    const footer = make("div", ["ckv-footer"]);
    footer.append(actionsGroup, filesGroup);
    root.append(footer);
    this.reportBox = make("div", ["ckv-report"]);
    this.codeBox = make("div", ["ckv-code"]);
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
      const bulk = event.target.closest("[data-bulk]");
      if (!bulk || bulk.getAttribute("aria-disabled") === "true") return;
      const args = { action: bulk.dataset.bulk, filter: this.filterText, regex: this.regex };
      if (this.shownStatuses.size < this.statusNames.length) args.statuses = [...this.shownStatuses];
      this.send("set_bulk", args);
    });
    resetButton.addEventListener("click", () => this.send("reset"));
    this.suggestBox.addEventListener("click", (event) => {
      if (event.target.closest("[data-accept-all]")) {
        this.send("accept_all");
        return;
      }
      const chosen = event.target.closest("[data-accept]");
      if (chosen) this.send("accept", { which: Number(chosen.dataset.accept) });
    });
    this.expandButton.addEventListener("click", () => {
      if (this.collapsed.size) this.collapsed.clear();
      else for (const path of this.groupPaths) this.collapsed.add(path);
      this.rebuildLines();
    });
    // Apply and Undo are never `disabled` (a disabled button drops the focus to the page):
    // aria-disabled says they cannot be used now, and a click then does nothing
    this.applyButton.addEventListener("click", () => {
      if (this.applyButton.getAttribute("aria-disabled") !== "true") this.request("apply", {}, "applying…");
    });
    this.undoButton.addEventListener("click", () => {
      if (this.undoButton.getAttribute("aria-disabled") !== "true") this.request("undo", {}, "undoing…");
    });
    this.prevButton.addEventListener("click", () => this.jumpToDifference(-1));
    this.nextButton.addEventListener("click", () => this.jumpToDifference(1));
    this.codeButton.addEventListener("click", () => {
      if (this.model.get("_code") && !this.model.get("code_stale")) {
        this.send("hide_code");
        return;
      }
      this.send("show_code");
    });
    this.saveButton.addEventListener("click", () => {
      this.confirmBox.hidden = true;
      this.request("save_plan", { path: this.pathInput.value }, "saving…");
    });
    this.loadButton.addEventListener("click", () => {
      this.confirmBox.hidden = true;
      this.request("load_plan", { path: this.pathInput.value }, "loading…");
    });
  }

  /** Saving would replace a file: ask before sending the same request with overwrite. */
  askOverwrite(path) {
    const replace = button(["ckv-danger"], "Replace it", "write the plan over the existing file");
    const cancel = button([], "Keep the file");
    replace.addEventListener("click", () => {
      this.confirmBox.hidden = true;
      this.request("save_plan", { path, overwrite: true }, "saving…");
    });
    cancel.addEventListener("click", () => {
      this.confirmBox.hidden = true;
      this.pathInput.focus();
    });
    const question = make("span", [], "Replace the existing plan file ");
    question.append(make("code", [], path), make("span", [], "?"));
    this.confirmBox.replaceChildren(question, replace, cancel);
    this.confirmBox.hidden = false;
    replace.focus();
  }

  // -- rows, tree and the visible lines ---------------------------------------------------------
  loadRows() {
    const state = this.model.get("_rows") || {};
    const fields = Array.isArray(state.fields) ? state.fields : [];
    const at = new Map(fields.map((name, i) => [name, i]));
    this.gen = state.gen || 0;
    this.actionOrder = Array.isArray(state.actions_order) ? state.actions_order : this.chosenActions;
    this.reasons = Array.isArray(state.reasons) ? state.reasons.map(textOf) : [];
    const sets = Array.isArray(state.refusal_sets) ? state.refusal_sets : [];
    const sameAsModel = state.same_as_model;
    // a side is the list of the declared columns' values (the key first), or null where the
    // row has no such side
    const sideValues = (values) => this.columns.map((c) => (Array.isArray(values) ? values[c.at] : null));
    const sideKey = (values) => (Array.isArray(values) ? keyOf(values[0]) : null);
    const data = decodeRows(state.data);
    this.rows = data.map((values, index) => {
      const get = (name) => (at.has(name) ? values[at.get(name)] : undefined);
      const model = get("model");
      const checkpoint = get("checkpoint") === sameAsModel ? model : get("checkpoint");
      const md = sideValues(model);
      const ck = checkpoint === model ? md : sideValues(checkpoint);
      const refused = sets[get("refused") - 1];
      const modelKey = sideKey(model);
      const ckptKey = sideKey(checkpoint);
      const key = modelKey ?? ckptKey ?? "";
      const place = keyOf(get("place")) ?? key;
      const cut = place.lastIndexOf(".");
      const tied = get("tied");
      return {
        index,
        key,
        module: cut < 0 ? "" : place.slice(0, cut),
        leaf: cut < 0 ? place : place.slice(cut + 1),
        renamed: Boolean(get("renamed")),
        status: textOf(get("status")),
        differs: this.differingStatuses.has(textOf(get("status"))) || Boolean(get("note")),
        modelKey,
        ckptKey,
        md,
        ck,
        note: textOf(get("note")),
        refused: Array.isArray(refused) ? refused : 0,
        tied: Array.isArray(tied) ? tied.map(textOf) : [],
      };
    });
    this.codes = typeof state.actions === "string" ? state.actions : "";
    this.rowOptions = new Map(optionPairs(state.options));
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
    // a big table opens on the groups that hold differences (the kernel says which); else all
    const expanded = Array.isArray(state.expanded) ? new Set(state.expanded.map(textOf)) : null;
    this.collapsed = new Set(expanded ? this.groupPaths.filter((path) => !expanded.has(path)) : []);
    // every row in the order the tree shows them, for "next difference" through closed groups
    this.treeOrder = [];
    const walkAll = (node) => {
      this.treeOrder.push(...node.rows);
      for (const child of node.children.values()) walkAll(child);
    };
    walkAll(this.tree);
    this.treePosition = new Int32Array(this.rows.length);
    this.treeOrder.forEach((rowIndex, position) => {
      this.treePosition[rowIndex] = position;
    });
    this.differenceCount = this.rows.filter((r) => r.differs).length;
    this.cursor = { line: 0, col: 0 };
    this.collectActionMasks();
    const refit = this.fitActions();
    this.rebuildLines();
    if (refit) this.fitWidth();
    this.renderCounters();
    this.renderDetails();
  }

  /** Why `action` is refused for row `index` ("" if it may apply). */
  refusal(index, action) {
    const refused = this.rows[index].refused;
    if (!refused) return "";
    const code = refused[this.actionOrder.indexOf(action)];
    return code ? this.reasons[code - 1] || "" : "";
  }

  /** The action an apply still in effect wrote to row `index`, or "". */
  appliedAction(index) {
    const applied = (this.model.get("_report") || {}).applied;
    const code = typeof applied === "string" ? applied[index] : undefined;
    return code && this.actionOfCode.has(code) ? this.actionOfCode.get(code) : "";
  }

  actionOf(index) {
    return this.actionOfCode.get(this.codes[index]) || "…";
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
    // first laid out (built before it was attached): the action column is sized now
    if (!this.actTrackPx) this.fitActions();
    const width = this.root.clientWidth;
    // the widest layout whose columns fit beside each other: wide, medium, else narrow
    const room = this.scroller.clientWidth;
    const fits = (mode) => room >= this.minTableWidth(mode);
    const mode = width >= 1000 && fits("wide") ? "wide" : width >= 680 && fits("medium") ? "medium" : "narrow";
    if (mode === this.mode) {
      // the columns grew or shrank: how much of each value fits changed with them
      if (this.measureRoom()) this.renderRows();
      return;
    }
    this.root.classList.remove(MODE_CLASS[this.mode]);
    this.mode = mode;
    this.root.classList.add(MODE_CLASS[mode]);
    this.fitColumns();
    this.renderHeader();
    this.renderRows();
  }

  // -- rendering --------------------------------------------------------------------------------
  renderInfo() {
    const info = this.model.get("_info") || {};
    this.title.replaceChildren(
      make("span", [], "Load "),
      make("b", [], info.checkpoint),
      make("span", [], " into "),
      make("b", [], info.model),
    );
    this.title.setAttribute("title", textOf(info.checkpoint_source));
    this.summary.textContent = textOf(info.summary).split("\n").join(" · ");
    if (!this.pathInput.value) this.pathInput.value = textOf(info.plan_path) || "plan.json";
    this.pathInput.setAttribute("title", `a file in ${textOf(info.plan_dir)} (plan files are kept inside this folder)`);
    this.moduleTypes = info.module_types && typeof info.module_types === "object" ? info.module_types : {};
    this.renderHeader();
    this.renderToolbar();
    this.renderRows();
  }

  /** The type of the module at `path`, or "" (never a property of the object's prototype). */
  moduleType(path) {
    return Object.prototype.hasOwnProperty.call(this.moduleTypes, path) ? textOf(this.moduleTypes[path]) : "";
  }

  renderHeader() {
    const info = this.model.get("_info") || {};
    const columns = this.sideColumns();
    const sideTitle = (label, name, sideClass) => {
      const title = make("div", ["ckv-side-title", sideClass, SPAN_CLASS[Math.min(columns.length, 8)]], `${label} `);
      title.setAttribute("role", "columnheader");
      title.setAttribute("title", textOf(name));
      title.append(make("span", [], name));
      return title;
    };
    const columnName = (text, classes) => {
      const cell = make("div", ["ckv-colname", ...classes], text);
      cell.setAttribute("role", "columnheader");
      return cell;
    };
    if (this.mode === "narrow") {
      const line = make("div", ["ckv-hline"]);
      line.append(
        sideTitle("checkpoint", info.checkpoint, "ckv-ck"),
        columnName("→", ["ckv-c-arrow"]),
        sideTitle("model", info.model, "ckv-md"),
      );
      line.setAttribute("role", "row");
      line.setAttribute("aria-rowindex", "1");
      this.columnLines.replaceChildren(line);
      return;
    }
    const top = make("div", ["ckv-hline", "ckv-grid"]);
    top.append(
      sideTitle("checkpoint", info.checkpoint, "ckv-ck"),
      columnName("status", ["ckv-c-status"]),
      sideTitle("model", info.model, "ckv-md"),
      columnName("action", ["ckv-c-act"]),
    );
    const sub = make("div", ["ckv-hline", "ckv-grid", "ckv-sub"]);
    const names = (sideClass) => columns.map((c) => columnName(c.title, [sideClass]));
    sub.append(
      ...names("ckv-ck"),
      columnName("", ["ckv-c-status"]),
      ...names("ckv-md"),
      columnName("", ["ckv-c-act"]),
    );
    top.setAttribute("role", "row");
    top.setAttribute("aria-rowindex", "1");
    sub.setAttribute("role", "row");
    sub.setAttribute("aria-rowindex", "2");
    this.columnLines.replaceChildren(top, sub);
    this.measureRoom();
  }

  renderToolbar() {
    const info = this.model.get("_info") || {};
    const statuses = info.statuses || {};
    const chips = this.statusNames
      .filter((s) => statuses[s])
      .map((s) => {
        const term = this.statusTerm(s);
        const on = this.shownStatuses.has(s);
        const chip = make("button", ["ckv-chip", this.roleClass(term.colour)], `${term.symbol} ${s} `);
        chip.setAttribute("type", "button");
        chip.setAttribute("data-status", s);
        chip.setAttribute("aria-pressed", String(on));
        chip.setAttribute("title", `${on ? "hide" : "show"} ${s} rows (${term.label})`);
        chip.append(make("b", [], numberText(statuses[s])));
        return chip;
      });
    this.statusChips.replaceChildren(...chips);
    const all = this.shownModelRows === this.rows.filter((r) => r.modelKey != null).length;
    this.bulkLabel.textContent = all
      ? `Set all ${numberText(this.shownModelRows)} rows to`
      : `Set the ${numberText(this.shownModelRows)} shown rows to`;
    for (const bulk of this.bulkButtons.children) {
      const action = bulk.dataset.bulk;
      bulk.setAttribute("aria-disabled", String(this.shownModelRows === 0));
      bulk.setAttribute("title", `${action} on every shown row that can take it: ${this.actionTerm(action).label}`);
    }
    this.expandButton.textContent = this.collapsed.size ? "expand all" : "collapse all";
    const none = !this.differenceCount;
    this.prevButton.setAttribute("aria-disabled", String(none));
    this.nextButton.setAttribute("aria-disabled", String(none));
    this.diffCount.textContent = none ? "no row differs" : `${plural(this.differenceCount, "row")} differ`;
  }

  renderCounters() {
    const parts = [];
    for (const action of this.actionNames) {
      const term = this.actionTerm(action);
      const [rows, values] = this.counts[action] || [0, 0];
      if (!term.chosen && !rows) continue;
      const counter = make("span", ["ckv-counter", this.roleClass(term.colour), rows ? "" : "ckv-zero"]);
      counter.setAttribute("title", `${numberText(rows)} rows, ${numberText(values)} values (parameters and buffers): ${term.label}`);
      counter.append(
        make("span", ["ckv-symbol"], term.symbol),
        make("b", [], action),
        make("span", [], ` ${plural(rows, "row")} · ${compactNumber(values)} values`),
      );
      parts.push(counter);
    }
    this.counters.replaceChildren(...parts);
  }

  renderRows() {
    if (!this.lines) return;
    const height = ROW_HEIGHT[this.mode];
    const total = this.lines.length;
    const headerHeight = this.header.offsetHeight;
    const headerRows = this.columnLines.children.length;
    this.spacer.style.height = `${total * height}px`;
    this.scroller.style.maxHeight = `${headerHeight + VISIBLE_LINES * height + 2}px`;
    this.scroller.setAttribute("aria-rowcount", String(total + headerRows));
    const top = Math.max(0, this.scroller.scrollTop);
    const viewport = Math.max(0, (this.scroller.clientHeight || VISIBLE_LINES * height) - headerHeight);
    const first = Math.max(0, Math.floor(top / height) - OVERSCAN);
    const last = Math.min(total, Math.ceil((top + viewport) / height) + OVERSCAN);
    const hadFocus = this.lineBox.contains(document.activeElement);
    const lines = [];
    for (let k = first; k < last; k++) {
      const line = this.lines[k];
      const node = line.kind === "row" ? this.rowLine(line) : this.groupLine(line);
      node.style.top = `${k * height}px`;
      node.setAttribute("aria-rowindex", String(k + 1 + headerRows));
      node.setAttribute("data-line", String(k));
      lines.push(node);
    }
    if (!total) lines.push(make("div", ["ckv-empty-table"], "no rows match the filter and the statuses chosen"));
    this.lineBox.replaceChildren(...lines);
    this.renderPath(Math.min(total - 1, Math.ceil(top / height)));
    // roving tabindex: the cursor's cell is the grid's one tab stop; when it is scrolled out of
    // the DOM, the first line in view stands in for it
    if (this.cursor.line >= total) this.cursor = { line: Math.max(0, total - 1), col: this.cursor.col };
    const target = this.cellAt(this.cursor.line, this.cursor.col) || this.cellAt(Math.min(last - 1, Math.max(first, Math.ceil(top / height))), this.cursor.col);
    if (target) {
      target.setAttribute("tabindex", "0");
      if (hadFocus) target.focus({ preventScroll: true });
    }
  }

  /** The path of the module the first line in view belongs to, above the lines. */
  renderPath(k) {
    const line = this.lines[k];
    if (!line || !this.groupPaths.length) {
      this.pathBar.hidden = true;
      return;
    }
    const path = line.kind === "row" ? this.rows[line.index].module : line.node.path;
    this.pathBar.hidden = false;
    this.pathBar.textContent = `in ${path ? path.split(".").join(" › ") : "the model's top level"}`;
    this.pathBar.setAttribute("title", path);
  }

  /** The focusable cells of line `k` in column order (a line shows only some actions, so its
   * columns may have gaps); empty when the line is not in the DOM. */
  cellsOf(k) {
    const node = this.lineBox.querySelector(`[data-line="${Number(k)}"]`);
    return node ? [...node.querySelectorAll("[data-col]")] : [];
  }

  /** The focusable element of line `k` at column `col` (−1: the twisty or the line's only cell),
   * else the nearest column the line has (the lower one on a tie); null when the line is not in
   * the DOM. */
  cellAt(k, col) {
    let best = null;
    let distance = Infinity;
    for (const cell of this.cellsOf(k)) {
      const d = Math.abs(Number(cell.dataset.col) - col);
      if (d < distance) [best, distance] = [cell, d];
    }
    return best;
  }

  /** The column of the cell next to column `col` on line `k` in direction `step` (over the
   * actions the line does not show); `col` itself at the line's edge. */
  columnBeside(k, col, step) {
    const cols = this.cellsOf(k).map((c) => Number(c.dataset.col));
    const beyond = cols.filter((c) => (step > 0 ? c > col : c < col));
    if (!beyond.length) return col;
    return step > 0 ? Math.min(...beyond) : Math.max(...beyond);
  }

  onGridFocus(event) {
    const cell = event.target.closest("[data-col]");
    const line = event.target.closest("[data-line]");
    if (!cell || !line) return;
    const k = Number(line.dataset.line);
    const col = Number(cell.dataset.col);
    if (this.cursor.line === k && this.cursor.col === col) return;
    this.cursor = { line: k, col };
    for (const old of this.lineBox.querySelectorAll('[tabindex="0"]')) if (old !== cell) old.setAttribute("tabindex", "-1");
    cell.setAttribute("tabindex", "0");
  }

  onGridKey(event) {
    if (!GRID_KEYS.has(event.key) || event.altKey || event.ctrlKey || event.metaKey) return;
    // a handled key is the table's: JupyterLab's command mode (arrows move cells, Enter edits)
    // never sees it
    event.stopPropagation();
    if (event.key === " " || event.key === "Enter") return; // the focused button's own click
    event.preventDefault();
    const total = this.lines.length;
    if (!total) return;
    let { line, col } = this.cursor;
    const page = VISIBLE_LINES - 1;
    const focused = this.lines[line];
    if (event.key === "ArrowDown") line = Math.min(total - 1, line + 1);
    else if (event.key === "ArrowUp") line = Math.max(0, line - 1);
    else if (event.key === "PageDown") line = Math.min(total - 1, line + page);
    else if (event.key === "PageUp") line = Math.max(0, line - page);
    else if (event.key === "Home") line = 0;
    else if (event.key === "End") line = total - 1;
    else if (event.key === "n" || event.key === "p") {
      this.jumpToDifference(event.key === "n" ? 1 : -1);
      return;
    } else if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      const step = event.key === "ArrowLeft" ? -1 : 1;
      // on a group's twisty, left closes the group and right opens it (the tree convention)
      if (focused && focused.kind === "group" && col === -1) {
        const open = !this.collapsed.has(focused.node.path);
        if (step < 0 ? open : !open) {
          this.toggleGroup(focused.node.path);
          return;
        }
      }
      col = this.columnBeside(line, col, step);
    }
    this.moveCursor(line, col);
  }

  /** Put the cursor on line `k`, column `col`: scrolled into view and focused. */
  moveCursor(k, col) {
    const height = ROW_HEIGHT[this.mode];
    const headerHeight = this.header.offsetHeight;
    const viewport = Math.max(height, this.scroller.clientHeight - headerHeight);
    const top = k * height;
    if (top < this.scroller.scrollTop) this.scroller.scrollTop = top;
    else if (top + height > this.scroller.scrollTop + viewport) this.scroller.scrollTop = top + height - viewport;
    this.cursor = { line: k, col };
    this.renderRows();
    const cell = this.cellAt(k, col);
    if (cell) {
      this.cursor.col = Number(cell.dataset.col) === -1 && col > -1 ? col : Number(cell.dataset.col);
      cell.focus({ preventScroll: true });
    }
  }

  toggleGroup(path) {
    if (this.collapsed.has(path)) this.collapsed.delete(path);
    else this.collapsed.add(path);
    const focus = this.lineBox.contains(document.activeElement);
    this.rebuildLines();
    if (focus) this.moveCursor(this.cursor.line, this.cursor.col);
  }

  /** The next (`step` 1) or previous (−1) row that differs, in tree order, among the rows the
   * statuses and filter show; its groups open, the cursor on it. */
  jumpToDifference(step) {
    if (!this.rows.length) return;
    const current = this.lines[this.cursor.line];
    let position = -1;
    if (current && current.kind === "row") position = this.treePosition[current.index];
    else if (current) position = this.treePosition[current.node.all[0]] - (step > 0 ? 1 : 0);
    const count = this.treeOrder.length;
    for (let n = 1; n <= count; n++) {
      const at = (((position + step * n) % count) + count) % count;
      const index = this.treeOrder[at];
      if (!this.rows[index].differs || !this.visible[index]) continue;
      const parts = this.rows[index].module ? this.rows[index].module.split(".") : [];
      for (let depth = 1; depth <= parts.length; depth++) this.collapsed.delete(parts.slice(0, depth).join("."));
      this.rebuildLines();
      const k = this.lines.findIndex((l) => l.kind === "row" && l.index === index);
      if (k >= 0) this.moveCursor(k, Math.max(0, this.cursor.col));
      return;
    }
  }

  /** After Apply, Undo or a file call: if the focus fell out of the widget, put it back. */
  keepFocus() {
    if (this.root.contains(document.activeElement) || document.activeElement !== document.body) return;
    if (this.lastFocus && this.root.contains(this.lastFocus)) this.lastFocus.focus();
  }

  /** How many characters of each declared column fit, measured on the column headers. */
  measureRoom() {
    const charWidth = this.probe.getBoundingClientRect().width / 10;
    // not laid out yet (the view is built before it is attached): nothing is cut until it is
    if (!charWidth) return false;
    this.charWidth = charWidth;
    this.emPx = parseFloat(getComputedStyle(this.root).fontSize) || 13;
    const names = this.columnLines.querySelectorAll(".ckv-sub .ckv-colname.ckv-md");
    const columns = this.sideColumns();
    let changed = false;
    names.forEach((cell, i) => {
      const column = columns[i];
      if (!column || !cell.clientWidth) return;
      const room = Math.max(4, Math.floor((cell.clientWidth - 14) / charWidth));
      if (this.room.get(column.key) !== room) changed = true;
      this.room.set(column.key, room);
    });
    return changed;
  }

  /** `text` fitted to its column (cut in the middle), `indent` characters taken by the tree. */
  fitted(column, text, indent = 0) {
    const room = this.room.get(column.key);
    return room ? middleCut(text, Math.max(4, room - indent)) : text;
  }

  /** A cell indented to a depth of the module tree. */
  indented(classes, depth) {
    const cell = make("div", classes);
    cell.style.setProperty("--ckv-depth", String(Math.min(Math.trunc(depth), MAX_DEPTH)));
    return cell;
  }

  /** The name cell of one side: the leaf name (the full key if renamed) and its tags. */
  nameCell(row, side, depth) {
    const key = side === "ck" ? row.ckptKey : row.modelKey;
    const shown = side === "ck" && row.renamed ? key : row.leaf;
    const cell = this.indented(["ckv-cell", "ckv-name", side === "ck" ? "ckv-ck" : "ckv-md"], depth);
    cell.setAttribute("title", row.note && side === "ck" ? `${key}: ${row.note}` : key);
    // the indentation and the tags take room; the key is cut in the middle, never at its end
    const indent = Math.ceil(((0.4 + Math.min(depth, MAX_DEPTH) * 1.1) * (this.emPx || 13)) / (this.charWidth || 7));
    const tags = (side === "ck" && row.renamed) || (side === "md" && row.tied.length) ? 9 : 0;
    cell.append(make("span", ["ckv-key"], this.fitted(this.columns[0], shown, indent + tags)));
    if (side === "ck" && row.renamed) {
      const tag = make("span", ["ckv-tag"], "renamed");
      tag.setAttribute("title", row.note);
      cell.append(tag);
    }
    if (side === "md" && row.tied.length) {
      const tag = make("span", ["ckv-tag"], "tied");
      tag.setAttribute("title", `shares its storage with ${row.tied.join(", ")}`);
      cell.append(tag);
    }
    return cell;
  }

  /** One declared column's cell: its value as text, flagged when the row's status says so. */
  valueCell(row, column, value, sideClass) {
    const cell = make("div", ["ckv-cell", KIND_CLASS[column.kind] || "ckv-text", sideClass]);
    if (column.flagged_by && column.flagged_by === row.status) {
      const term = this.statusTerm(row.status);
      cell.classList.add("ckv-flag", this.roleClass(term.colour));
      const icon = make("span", ["ckv-icon"], term.symbol);
      icon.setAttribute("aria-label", `${column.title} differs`);
      cell.append(icon);
    }
    const text = cellText(column.kind, value);
    cell.setAttribute("title", `${column.title}: ${text}`);
    cell.append(make("span", [], this.fitted(column, text, cell.classList.contains("ckv-flag") ? 2 : 0)));
    return cell;
  }

  sideCells(row, side, depth) {
    const key = side === "ck" ? row.ckptKey : row.modelKey;
    const sideClass = side === "ck" ? "ckv-ck" : "ckv-md";
    const columns = this.sideColumns();
    if (key == null) {
      const what = side === "ck" ? "not in the checkpoint" : "not in the model";
      return [make("div", ["ckv-cell", "ckv-absent", sideClass, SPAN_CLASS[Math.min(columns.length, 8)]], what)];
    }
    const values = side === "ck" ? row.ck : row.md;
    return columns.map((column) =>
      column.kind === "key"
        ? this.nameCell(row, side, depth)
        : this.valueCell(row, column, values[this.columns.indexOf(column)], sideClass),
    );
  }

  statusBadge(status) {
    const term = this.statusTerm(status);
    const badge = make("span", ["ckv-badge", this.roleClass(term.colour)], `${term.symbol} ${status}`);
    badge.setAttribute("title", term.label);
    return badge;
  }

  actionCell(row) {
    const cell = make("div", ["ckv-cell", "ckv-act"]);
    if (row.modelKey == null) {
      const skip = make("span", ["ckv-never"], `${this.skipAction} · never applied`);
      skip.setAttribute("title", this.refusal(row.index, this.chosenActions[0]) || this.actionTerm(this.skipAction).label);
      skip.setAttribute("data-col", "-1");
      skip.setAttribute("tabindex", "-1");
      cell.append(skip);
      return cell;
    }
    const current = this.actionOf(row.index);
    const group = make("div", ["ckv-seg"]);
    group.setAttribute("role", "radiogroup");
    group.setAttribute("aria-label", `action for ${row.key}`);
    for (const action of this.shownActions(row.index)) {
      const term = this.actionTerm(action);
      const why = this.refusal(row.index, action);
      const choice = button([this.roleClass(term.colour)], action, why ? `${action} is not possible: ${why}` : `${action}: ${term.label}`);
      choice.setAttribute("data-i", String(row.index));
      choice.setAttribute("data-a", action);
      choice.setAttribute("data-col", String(this.chosenActions.indexOf(action)));
      choice.setAttribute("tabindex", "-1");
      choice.setAttribute("aria-pressed", String(current === action));
      choice.setAttribute("aria-disabled", String(Boolean(why)));
      if (current === action && this.rowOptions.has(row.index)) {
        // the options travel with the action: "partial · fill mean", in the text and the name
        const shown = this.actionWithOptions(row.index);
        choice.classList.add("ckv-with-options");
        choice.setAttribute("title", `${shown}: ${term.label}`);
        choice.append(make("span", ["ckv-opt-mark"], this.optionMark(row.index)));
      }
      group.append(choice);
    }
    cell.append(group);
    return cell;
  }

  rowLine(line) {
    const row = this.rows[line.index];
    const node = make("div", ["ckv-line", "ckv-row", "ckv-grid"]);
    if (this.focus?.kind === "row" && this.focus.index === row.index) node.classList.add("ckv-focused");
    node.setAttribute("role", "row");
    node.setAttribute("data-row", String(row.index));
    node.setAttribute("data-key", row.key);
    node.setAttribute("data-status", row.status);
    const status = make("div", ["ckv-cell", "ckv-status"]);
    status.append(this.statusBadge(row.status));
    const applied = this.appliedAction(row.index);
    if (applied) {
      const term = this.actionTerm(applied);
      node.classList.add("ckv-applied-row");
      const mark = make("span", ["ckv-applied", this.roleClass(term.colour)], term.symbol);
      mark.setAttribute("title", `applied: ${applied} (written to the model by an apply not undone)`);
      mark.setAttribute("aria-label", `applied ${applied}`);
      status.append(mark);
    }
    if (this.mode === "narrow") {
      const name = this.indented(["ckv-cell", "ckv-name"], line.depth);
      name.setAttribute("title", row.renamed ? `${row.ckptKey} → ${row.key}` : row.key);
      const shown = row.renamed ? `${row.ckptKey} → ${row.leaf}` : row.leaf;
      name.append(make("span", ["ckv-key"], middleCut(shown, 34)));
      node.append(status, name, this.actionCell(row), this.pairCell(row));
    } else {
      node.append(...this.sideCells(row, "ck", line.depth), status, ...this.sideCells(row, "md", line.depth), this.actionCell(row));
    }
    for (const cell of node.children) cell.setAttribute("role", "gridcell");
    return node;
  }

  /** Narrow layout: both sides' short columns on one line, "checkpoint → model". */
  pairCell(row) {
    const cell = make("div", ["ckv-cell", "ckv-pair"]);
    const side = (key, values, what) => {
      if (key == null) return [make("span", ["ckv-absent-text"], what)];
      const parts = [];
      for (const column of this.sideColumns()) {
        const value = values[this.columns.indexOf(column)];
        const part = make("span", [], cellText(column.kind, value));
        if (column.flagged_by && column.flagged_by === row.status) {
          part.classList.add("ckv-flag", this.roleClass(this.statusTerm(row.status).colour));
        }
        if (parts.length) parts.push(make("span", [], " "));
        parts.push(part);
      }
      return parts;
    };
    cell.append(
      ...side(row.ckptKey, row.ck, "not in the checkpoint"),
      make("span", [], " → "),
      ...side(row.modelKey, row.md, "not in the model"),
    );
    cell.setAttribute("title", cell.textContent);
    return cell;
  }

  groupSummary(node) {
    // counts keyed by names: no prototype, so no name can reach an inherited property
    const statuses = Object.create(null);
    const actions = Object.create(null);
    const refused = Object.create(null);
    let modelRows = 0;
    for (const i of node.all) {
      const row = this.rows[i];
      statuses[row.status] = (statuses[row.status] || 0) + 1;
      if (row.modelKey == null) continue;
      modelRows += 1;
      const action = this.actionOf(i);
      actions[action] = (actions[action] || 0) + 1;
      for (const a of this.chosenActions) {
        const why = this.refusal(i, a);
        if (why) (refused[a] ||= []).push(`${row.key}: ${why}`);
      }
    }
    return { statuses, actions, refused, modelRows };
  }

  groupLine(line) {
    const node = line.node;
    const { statuses, actions, refused, modelRows } = this.groupSummary(node);
    const open = !this.collapsed.has(node.path);
    const type = this.moduleType(node.path);
    const group = make("div", ["ckv-line", "ckv-group", "ckv-grid"]);
    if (this.focus?.kind === "group" && this.focus.path === node.path) group.classList.add("ckv-focused");
    group.setAttribute("role", "row");
    group.setAttribute("data-group", node.path);

    const label = this.indented(["ckv-cell", "ckv-glabel"], line.depth);
    const twisty = make("button", ["ckv-twisty"], open ? "▾" : "▸");
    twisty.setAttribute("type", "button");
    twisty.setAttribute("data-toggle", node.path);
    twisty.setAttribute("data-col", "-1");
    twisty.setAttribute("tabindex", "-1");
    twisty.setAttribute("aria-expanded", String(open));
    twisty.setAttribute("title", `${open ? "collapse" : "expand"} ${node.path}`);
    const name = make("span", ["ckv-gname"], line.label);
    name.setAttribute("title", node.path);
    label.append(twisty, name);
    if (type) label.append(make("span", ["ckv-gtype"], type));
    const meta = make("span", ["ckv-gmeta"], plural(node.all.length, "tensor"));
    for (const s of this.statusNames) {
      if (!statuses[s]) continue;
      const term = this.statusTerm(s);
      meta.append(make("span", [], " "), make("span", ["ckv-mini", this.roleClass(term.colour)], `${term.symbol} ${statuses[s]} ${s}`));
    }
    label.append(meta);

    const controls = make("div", ["ckv-cell", "ckv-act"]);
    if (modelRows) {
      const seg = make("div", ["ckv-seg"]);
      seg.setAttribute("role", "group");
      seg.setAttribute("aria-label", `action for every tensor under ${node.path}`);
      for (const action of this.chosenActions) {
        const count = actions[action] || 0;
        const cannot = refused[action] || [];
        const none = cannot.length === modelRows;
        // an action not always shown appears where one row under the line may take it or has it
        if (!this.alwaysShown.has(action) && none && !count) continue;
        const pressed = count === modelRows ? "true" : count ? "mixed" : "false";
        let title = none
          ? `${action} is not possible for any tensor under ${node.path}: ${cannot[0] || "no model tensors here"}`
          : `${action} on the ${modelRows - cannot.length} tensors under ${node.path} that can take it`;
        if (!none && cannot.length) title += `; ${cannot.length} cannot: ${cannot.slice(0, 3).join("; ")}`;
        const choice = button([this.roleClass(this.actionTerm(action).colour)], action, title);
        choice.setAttribute("data-g", node.path);
        choice.setAttribute("data-a", action);
        choice.setAttribute("data-col", String(this.chosenActions.indexOf(action)));
        choice.setAttribute("tabindex", "-1");
        choice.setAttribute("aria-pressed", pressed);
        choice.setAttribute("aria-disabled", String(none));
        seg.append(choice);
      }
      controls.append(seg);
    } else {
      const skip = make("span", ["ckv-never"], `${this.skipAction} · never applied`);
      skip.setAttribute("title", "the model has no tensors here: these checkpoint entries are never applied");
      controls.append(skip);
    }
    group.append(label, controls);
    label.setAttribute("role", "gridcell");
    controls.setAttribute("role", "gridcell");
    return group;
  }

  onTableClick(event) {
    const toggle = event.target.closest("[data-toggle]");
    if (toggle) {
      this.toggleGroup(toggle.dataset.toggle);
      return;
    }
    const choice = event.target.closest("button[data-a]");
    if (!choice) return;
    if (choice.getAttribute("aria-disabled") === "true") {
      this.details.replaceChildren(make("span", ["ckv-refused"], choice.getAttribute("title")));
      return;
    }
    const action = choice.dataset.a;
    if (choice.dataset.i !== undefined) {
      const row = this.rows[Number(choice.dataset.i)];
      this.send("set_action", { pattern: row.modelKey, action });
    } else {
      this.send("set_module", { module: choice.dataset.g, action });
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
    this.renderOptions();
    const focus = this.focus;
    if (!focus) {
      this.details.replaceChildren(
        make("span", ["ckv-hint"], "Point at a row for what its status means and what each action would do."),
      );
      return;
    }
    if (focus.kind === "group") {
      const node = this.findNode(focus.path);
      if (!node) return;
      const { statuses, actions } = this.groupSummary(node);
      const st = this.statusNames.filter((s) => statuses[s]).map((s) => `${statuses[s]} ${s}`).join(", ");
      const ac = this.actionNames.filter((a) => actions[a]).map((a) => `${actions[a]} ${a}`).join(", ");
      this.details.replaceChildren(
        make("b", [], focus.path),
        make("span", [], ` ${this.moduleType(focus.path)}: ${node.all.length} tensors (${st}); now ${ac || "nothing to apply"}. `),
        make("span", [], "The buttons on this line set every tensor under it that can take the action."),
      );
      return;
    }
    const row = this.rows[focus.index];
    if (!row) return;
    const text = this.explanations.get(focus.index);
    // both sides in full: what a narrow column cuts in the middle is whole here
    const side = (label, key, values) => {
      const line = make("div", ["ckv-full"]);
      line.append(make("span", ["ckv-dim"], `${label}: `));
      if (key == null) {
        line.append(make("i", [], "absent"));
        return line;
      }
      line.append(make("code", [], key));
      for (const column of this.columns.slice(1)) {
        const value = values[this.columns.indexOf(column)];
        line.append(make("span", [], ` ${column.title} `), make("code", [], cellText(column.kind, value)));
      }
      return line;
    };
    const parts = [
      this.statusBadge(row.status),
      make("span", [], " "),
      make("b", [], row.key),
      make("span", ["ckv-now"], `action: ${this.actionWithOptions(row.index)}`),
      side("checkpoint", row.ckptKey, row.ck),
      side("model", row.modelKey, row.md),
      make("span", ["ckv-explain"], text === undefined ? "…" : text),
    ];
    const refused = this.chosenActions.map((a) => [a, this.refusal(row.index, a)]).filter(([, why]) => why && row.modelKey != null);
    // the general actions' reasons in full; the rare ones (not always shown) in one short line,
    // their reasons on hover, so the words that matter for this row stay readable
    const general = refused.filter(([a]) => this.alwaysShown.has(a));
    const rare = refused.filter(([a]) => !this.alwaysShown.has(a));
    if (general.length) {
      const box = make("div", ["ckv-refused"]);
      general.forEach(([action, why], i) => {
        if (i) box.append(make("span", [], " · "));
        box.append(make("b", [], action), make("span", [], ` not possible: ${why}`));
      });
      parts.push(box);
    }
    if (rare.length) {
      const names = rare.map(([a]) => a);
      const fit = names.length === 1 ? "does" : "do";
      const also = make("div", ["ckv-refused", "ckv-also"], `also: ${names.join(", ")} ${fit} not fit this row`);
      also.setAttribute("title", rare.map(([a, why]) => `${a}: ${why}`).join("\n"));
      parts.push(also);
    }
    this.details.replaceChildren(...parts);
  }

  /** A control per option of the pointed row's action, labelled with its words; rebuilt only
   * when the row, its action or its options change, focus kept on the same option. */
  renderOptions() {
    const focus = this.focus;
    const row = focus?.kind === "row" ? this.rows[focus.index] : undefined;
    const action = row && row.modelKey != null ? this.actionOf(row.index) : "";
    const options = action ? this.optionsOf(row.index, action) : [];
    const shown = options.length ? JSON.stringify([row.index, action, options.map((o) => o.value)]) : "";
    if (shown === this.optionsShown) return;
    const active = this.root.ownerDocument.activeElement;
    const inside = this.optionsBox.contains(active);
    // while the reader works in the controls, pointing at another row does not take them away
    if (inside && this.optionsRow !== undefined && (!row || row.index !== this.optionsRow)) return;
    const refocus = inside ? active.getAttribute("data-option") : null;
    this.optionsShown = shown;
    this.optionsRow = options.length ? row.index : undefined;
    this.optionsBox.hidden = !options.length;
    if (!options.length) {
      this.optionsBox.replaceChildren();
      return;
    }
    this.optionsBox.setAttribute("aria-label", `options of ${action} for ${row.key}`);
    const title = make("span", ["ckv-options-title"], `${action} options for `);
    title.append(make("code", [], row.key));
    const parts = [title];
    for (const [n, { spec, value }] of options.entries()) {
      const field = make("div", ["ckv-option"]);
      const label = make("label", ["ckv-option-label"]);
      const words = make("span", ["ckv-option-words"], spec.words);
      words.setAttribute("id", `ckvoption${this.widgetNumber}-${n}`);
      let control;
      if (spec.kind === "bool") {
        control = make("input", ["ckv-option-control"]);
        control.setAttribute("type", "checkbox");
        control.checked = Boolean(value);
      } else if (Array.isArray(spec.choices) && spec.choices.length) {
        control = make("select", ["ckv-option-control"]);
        for (const choice of spec.choices) {
          const item = make("option", [], optionValueText(choice));
          item.value = optionValueText(choice);
          item.selected = choice === value;
          control.append(item);
        }
      } else {
        control = make("input", ["ckv-option-control"]);
        control.setAttribute("type", spec.kind === "str" ? "text" : "number");
        if (spec.kind === "int") control.setAttribute("step", "1");
        if (spec.kind === "float") control.setAttribute("step", "any");
        control.value = optionValueText(value);
      }
      control.setAttribute("data-option", spec.name);
      control.setAttribute("aria-describedby", `ckvoption${this.widgetNumber}-${n}`);
      label.append(make("span", ["ckv-option-name"], spec.name), control);
      field.append(label, words);
      parts.push(field);
    }
    this.optionsBox.replaceChildren(...parts);
    if (refocus !== null) {
      for (const control of this.optionsBox.querySelectorAll("[data-option]")) {
        if (control.getAttribute("data-option") === refocus) control.focus();
      }
    }
  }

  /** A control changed: send the row's action with all its options, this one's new value. */
  onOptionChange(event) {
    const control = event.target.closest("[data-option]");
    if (!control || this.optionsRow === undefined) return;
    const row = this.rows[this.optionsRow];
    const action = this.actionOf(row.index);
    const options = {};
    for (const { spec, value } of this.optionsOf(row.index, action)) {
      options[spec.name] = value;
      if (spec.name !== control.getAttribute("data-option")) continue;
      if (spec.kind === "bool") {
        options[spec.name] = control.checked;
      } else if (Array.isArray(spec.choices) && spec.choices.length) {
        // back to the declared value: a choice's text is its value as words
        options[spec.name] = spec.choices.find((c) => optionValueText(c) === control.value) ?? value;
      } else if (spec.kind === "int" || spec.kind === "float") {
        // a number the kernel checks; text that is no number goes as it is, refused in words
        const number = Number(control.value);
        options[spec.name] = control.value.trim() !== "" && Number.isFinite(number) ? number : control.value;
      } else {
        options[spec.name] = control.value;
      }
    }
    // answered by "done" (after the action delta, if any): the controls are then built again
    // from what the kernel holds, so a refused value does not stay shown
    this.optionsShown = "";
    this.request("set_action", { pattern: row.modelKey, action, options }, "setting options");
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
    // a model tensor no checkpoint entry feeds, and a checkpoint entry that feeds nothing
    const missing = this.rows.filter((r) => r.modelKey != null && r.ckptKey == null);
    const unexpected = this.rows.filter((r) => r.modelKey == null && r.ckptKey != null);
    if (!items.length && !(missing.length && unexpected.length)) {
      this.suggestBox.replaceChildren();
      this.suggestBox.hidden = true;
      return;
    }
    this.suggestBox.hidden = false;
    const accept = (index, label) => {
      const node = button([], label);
      node.setAttribute("data-accept", String(index));
      return node;
    };
    const rules = items.filter((item) => item.kind === "rule");
    const pairs = items.filter((item) => item.kind !== "rule");
    const head = make("div", ["ckv-suggest-title"], "Renamed keys? ");
    const total = rules.reduce((n, r) => n + Number(r.pairs || 0), 0) + pairs.length;
    head.append(make("span", ["ckv-dim"], `${plural(rules.length, "rule")}, ${plural(pairs.length, "single pair")}: up to ${plural(total, "tensor")} to pair `));
    if (items.length) {
      const all = button([], "accept all", "take every rule and every pair listed");
      all.setAttribute("data-accept-all", "1");
      head.append(all);
    }
    const children = [head];
    if (rules.length) {
      const list = make("ul", ["ckv-suggestions"]);
      for (const rule of rules) {
        const li = make("li");
        const readable = make("code", [], rule.readable);
        readable.setAttribute("title", `regular expression ${textOf(rule.pattern)} → ${textOf(rule.replacement)}`);
        li.append(make("span", [], "rule "), readable, make("span", [], ` pairs ${plural(Number(rule.pairs || 0), "key")} `), accept(rule.index, "accept rule"));
        const examples = Array.isArray(rule.examples) ? rule.examples : [];
        if (examples.length) {
          const eg = make("div", ["ckv-dim", "ckv-examples"], "e.g. ");
          examples.forEach(([from, to], i) => {
            if (i) eg.append(make("span", [], "; "));
            eg.append(make("code", [], from), make("span", [], " → "), make("code", [], to));
          });
          li.append(eg);
        }
        list.append(li);
      }
      children.push(list);
    }
    if (pairs.length) {
      const pairLine = (item) => {
        const li = make("li");
        li.append(
          make("span", [], "checkpoint "),
          make("code", [], item.checkpoint_key),
          make("span", [], " → model "),
          make("code", [], item.model_key),
          make("span", [], " "),
          make("span", ["ckv-dim"], `(${textOf(item.reason)})`),
          make("span", [], " "),
          accept(item.index, "accept"),
        );
        return li;
      };
      const SHOWN = 5;
      const list = make("ul", ["ckv-suggestions"]);
      list.append(...pairs.slice(0, SHOWN).map(pairLine));
      children.push(list);
      if (pairs.length > SHOWN) {
        // a long list stays folded: the table must not move far down the page
        const more = make("details", ["ckv-more"]);
        more.append(make("summary", [], `${plural(pairs.length - SHOWN, "more suggested pair")}`));
        const rest = make("ul", ["ckv-suggestions"]);
        rest.append(...pairs.slice(SHOWN).map(pairLine));
        more.append(rest);
        children.push(more);
      }
    }
    if (missing.length && unexpected.length) {
      const picker = (label, rows, keyOfRow) => {
        const select = make("select");
        select.setAttribute("aria-label", label);
        for (const r of rows.slice(0, 2000)) {
          const option = make("option", [], keyOfRow(r));
          option.value = keyOfRow(r);
          select.append(option);
        }
        return select;
      };
      const pickCkpt = picker("unexpected checkpoint key", unexpected, (r) => r.ckptKey);
      const pickModel = picker("missing model key", missing, (r) => r.modelKey);
      const pairButton = button([], "pair");
      pairButton.addEventListener("click", () =>
        this.send("pair", { model_key: pickModel.value, checkpoint_key: pickCkpt.value }),
      );
      const byHand = make("div", ["ckv-pair-hand"]);
      byHand.append(
        make("span", [], "pair by hand: checkpoint "),
        pickCkpt,
        make("span", [], " feeds model "),
        pickModel,
        pairButton,
      );
      children.push(byHand);
    }
    this.suggestBox.replaceChildren(...children);
  }

  renderReport() {
    const report = this.model.get("_report") || {};
    this.undoButton.setAttribute("aria-disabled", String(!report.can_undo));
    if (!report.summary) {
      this.reportBox.replaceChildren();
      this.reportBox.hidden = true;
      return;
    }
    this.reportBox.hidden = false;
    const state = report.undone
      ? make("span", ["ckv-badge", "ckv-role-neutral"], "↶ undone")
      : report.verified
        ? make("span", ["ckv-badge", "ckv-role-ok"], "✓ applied and verified")
        : make("span", ["ckv-badge", "ckv-role-bad"], "✗ NOT verified");
    const head = make("div", ["ckv-report-head"]);
    head.append(state, make("span", [], " "), make("span", [], report.summary));
    const list = make("ul");
    const counts = report.counts || {};
    const reportKeys = report.keys || {};
    for (const action of this.chosenActions) {
      const c = counts[action];
      if (!c || !c.rows) continue;
      const keys = Array.isArray(reportKeys[action]) ? reportKeys[action] : [];
      const term = this.actionTerm(action);
      const counter = make("span", ["ckv-counter", this.roleClass(term.colour)]);
      counter.append(make("span", ["ckv-symbol"], term.symbol), make("b", [], action), make("span", [], ` ${numberText(c.rows)}`));
      const li = make("li");
      li.append(counter, make("span", [], ` ${numberText(c.numel)} values, ${bytesText(c.bytes)}: `));
      keys.forEach((key, i) => {
        if (i) li.append(make("span", [], ", "));
        li.append(make("code", [], key));
      });
      if (c.rows > keys.length) li.append(make("span", [], ` and ${numberText(c.rows - keys.length)} more`));
      list.append(li);
    }
    const notes = (Array.isArray(report.notes) ? report.notes : []).map((n) => make("div", ["ckv-dim"], `note: ${textOf(n)}`));
    const history = Array.isArray(report.history) ? report.history : [];
    const steps = make("ol", ["ckv-history"]);
    steps.setAttribute("aria-label", "applies and undos, oldest first");
    for (const entry of history) {
      const li = make("li", [entry.undoable ? "ckv-undoable" : ""]);
      li.append(make("b", [], `#${numberText(entry.step)} ${textOf(entry.kind)} `), make("span", [], textOf(entry.summary)));
      if (entry.undoable) li.append(make("span", ["ckv-badge", "ckv-role-accent"], "Undo puts this back"));
      steps.append(li);
    }
    const historyBox = make("details", ["ckv-more"]);
    historyBox.open = history.length <= 4;
    historyBox.append(make("summary", [], `history: ${plural(history.length, "step")}`), steps);
    this.reportBox.replaceChildren(head, list, ...notes, historyBox);
  }

  renderMessages() {
    const error = this.model.get("error");
    const notice = this.model.get("notice");
    this.errorBox.textContent = textOf(error);
    this.errorBox.hidden = !error;
    this.noticeBox.textContent = textOf(notice);
    this.noticeBox.hidden = !notice;
    if (!error) this.confirmBox.hidden = true;
    if (error) {
      this.pending.clear();
      this.renderBusy();
    }
  }

  renderBusy() {
    const labels = [...this.pending.values()];
    this.busy.textContent = labels.length ? labels[labels.length - 1] : "";
    this.applyButton.setAttribute("aria-disabled", String(labels.length > 0));
  }

  renderCode() {
    const code = textOf(this.model.get("_code"));
    const stale = Boolean(this.model.get("code_stale"));
    this.codeButton.setAttribute("aria-pressed", String(Boolean(code) && !stale));
    if (!code) {
      this.codeBox.replaceChildren();
      this.codeBox.hidden = true;
      return;
    }
    this.codeBox.hidden = false;
    const copy = button([], "copy");
    const pre = make("pre");
    pre.append(make("code", [], code));
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
    const head = make("div", ["ckv-code-head"]);
    head.append(
      make(
        "span",
        [stale ? "ckv-stale" : ""],
        stale
          ? "The plan changed since: press Code again for the current code."
          : "Plain PyTorch that does what Apply does (paste it into a cell, with model in scope):",
      ),
      copy,
    );
    this.codeBox.replaceChildren(head, pre);
  }
}

export default {
  render({ model, el }) {
    const view = new LoaderView(model, el);
    return () => view.destroy();
  },
};
