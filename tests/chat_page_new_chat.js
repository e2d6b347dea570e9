// The chat page's script against a stub DOM and fetch (tests/test_serve.py): a reply streams, "New chat" is
// clicked halfway, a message is sent at once. Prints the messages of each chat request as JSON. With "stop":
// Stop is pressed before the reply's first piece, then another message is sent. With "overflow": the second
// question finds the context full once, and the page's bubbles are printed in order. With "empty": the replies end
// with no text.
const fs = require("fs");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.slice(html.indexOf("<script>") + 8, html.lastIndexOf("</script>"));
const handlers = {}, elements = {};
function element(id) {
  return {id, value: "", textContent: "", innerHTML: "", dataset: {}, children: [],
          classList: {add() {}, remove() {}, toggle() {}},
          addEventListener(type, f) { handlers[id + ":" + type] = f; },
          appendChild(c) { this.children.push(c); }, replaceChildren() { this.children = []; },
          insertBefore(c, ref) { this.children = this.children.filter((x) => x !== c);
                                 this.children.splice(this.children.indexOf(ref), 0, c); },
          remove() {}, scrollIntoView() {}, requestSubmit() { handlers[id + ":submit"]({preventDefault() {}}); }};
}
global.document = {getElementById: (id) => (elements[id] ??= element(id)), createElement: () => element("")};
global.localStorage = {getItem: () => null, setItem() {}};
const sent = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
global.fetch = async (url, opts = {}) => {
  if (url === "/v1/models") return {ok: true, json: async () => ({data: [{id: "m"}]})};
  if (url === "/render") return {ok: true, json: async () => ({html: JSON.parse(opts.body).text})};
  sent.push(JSON.parse(opts.body).messages);
  if (process.argv[3] === "overflow" && sent.length === 2) {  // the second question: the context is full once
    return {ok: false, status: 400, json: async () => ({error: {code: "context_length_exceeded", message: "full"}})};
  }
  let n = 0;
  return {ok: true, body: {getReader: () => ({read: async () => {
    await sleep(5);
    if (opts.signal.aborted) throw Object.assign(new Error("aborted"), {name: "AbortError"});
    if (n++ >= (process.argv[3] === "empty" ? 0 : 50)) return {done: true};
    const chunk = {choices: [{delta: {content: "old" + n + " "}}]};
    return {done: false, value: new TextEncoder().encode("data: " + JSON.stringify(chunk) + "\n\n")};
  }})}};
};
eval(script);
(async () => {
  const say = async (text) => { elements.input.value = text; handlers["composer:submit"]({preventDefault() {}}); };
  await sleep(20);
  if (process.argv[3] === "overflow") {  // the note on older turns goes before the question it was sent with
    await say("first question");
    await sleep(400);
    await say("second question");
    await sleep(400);
    console.log(JSON.stringify(elements.messages.children.map((c) => [c.className, c.textContent.slice(0, 15)])));
    process.exit(0);
  }
  if (process.argv[3] === "empty") {  // a reply that ends with no text (an undertrained model's first <|im_end|>)
    await say("first question");
    await sleep(40);
    await say("next question");
    await sleep(40);
    console.log(JSON.stringify(sent));
    process.exit(0);
  }
  if (process.argv[3] === "stop") {  // Stop pressed before the first piece of the reply came
    await say("stopped at once");
    handlers["composer:submit"]({preventDefault() {}});  // the Send button reads Stop
    await sleep(30);
    const back = elements.input.value;
    await say("next question");
    await sleep(30);
    handlers["composer:submit"]({preventDefault() {}});
    await sleep(30);
    console.log(JSON.stringify({sent, back}));
    process.exit(0);
  }
  await say("first question");
  await sleep(60);  // part of the reply has streamed
  handlers["new:click"]();
  await say("second question (new chat)");  // at once: before the first reply's clean-up has run
  await sleep(120);
  console.log(JSON.stringify(sent));
  process.exit(0);
})();
