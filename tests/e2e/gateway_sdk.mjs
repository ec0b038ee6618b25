// The official openai npm package against the gateway's one base URL: each model answers
// under its own name (streaming and not), an unknown model is 404 model_not_found, the keyed
// model is 401 without its key, /models is filtered by the key. With WAKE_ONLY=1: one streamed
// request for the keyed model (the wake-from-zero test runs it beside the Python clients).
// Prints one JSON object summarising what happened.
import OpenAI from "../js/node_modules/openai/index.mjs";

const baseURL = process.env.GATEWAY_BASE_URL;
const models = JSON.parse(process.env.MODELS); // [{model, role, key}]
const out = { models: {} };

async function streamed(client, model) {
  const stream = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Count to three." }], max_tokens: 8, temperature: 0, stream: true,
  });
  let text = "";
  const roles = [];
  const names = new Set();
  for await (const chunk of stream) {
    names.add(chunk.model);
    if (chunk.choices.length && chunk.choices[0].delta.role) roles.push(chunk.choices[0].delta.role);
    if (chunk.choices.length && chunk.choices[0].delta.content) text += chunk.choices[0].delta.content;
  }
  return { text, roles, names: [...names] };
}

if (process.env.WAKE_ONLY === "1") {
  const { model, key } = models[0];
  out.stream = await streamed(new OpenAI({ apiKey: key, baseURL, maxRetries: 0, timeout: 600000 }), model);
  console.log(JSON.stringify(out));
  process.exit(0);
}

for (const { model, key } of models) {
  const client = new OpenAI({ apiKey: key, baseURL, maxRetries: 0, timeout: 120000 });
  const reply = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Say hello." }], max_tokens: 8, temperature: 0,
  });
  out.models[model] = {
    model: reply.model, role: reply.choices[0].message.role, content: reply.choices[0].message.content,
    stream: await streamed(client, model),
    listed: (await client.models.list()).data.map((m) => m.id).sort(),
  };
}

const anonymous = new OpenAI({ apiKey: "not-a-key", baseURL, maxRetries: 0 });
out.listedWithoutKey = (await anonymous.models.list()).data.map((m) => m.id).sort();
const keyed = models.find((m) => m.key !== "unused");
try {
  await anonymous.chat.completions.create({ model: keyed.model, messages: [{ role: "user", content: "x" }] });
  out.auth = { status: 200 };
} catch (err) {
  out.auth = { isAuth: err instanceof OpenAI.AuthenticationError, status: err.status, code: err.code };
}
try {
  await anonymous.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
  out.notFound = { status: 200 };
} catch (err) {
  out.notFound = { isNotFound: err instanceof OpenAI.NotFoundError, status: err.status, code: err.code, param: err.param };
}
console.log(JSON.stringify(out));
