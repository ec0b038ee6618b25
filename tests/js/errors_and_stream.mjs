// The official openai npm package against the runtime: a streamed chat
// completion, and the SDK's error classes for a wrong key and a wrong model.
// Prints one JSON object summarising what happened.
import OpenAI from "openai";

const baseURL = process.env.RUNTIME_BASE_URL;
const model = process.env.RUNTIME_MODEL;
const client = new OpenAI({ apiKey: process.env.RUNTIME_API_KEY, baseURL, maxRetries: 0 });
const out = {};

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Count to three." }],
  max_tokens: 8,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let roles = [];
for await (const chunk of stream) {
  if (chunk.choices.length && chunk.choices[0].delta.role) roles.push(chunk.choices[0].delta.role);
  if (chunk.choices.length && chunk.choices[0].delta.content) text += chunk.choices[0].delta.content;
  if (chunk.usage) out.usage = chunk.usage;
}
out.text = text;
out.roles = roles;

try {
  await new OpenAI({ apiKey: "wrong-key", baseURL, maxRetries: 0 }).models.list();
} catch (err) {
  out.auth = { cls: err.constructor.name, isAuth: err instanceof OpenAI.AuthenticationError, status: err.status, code: err.code };
}
try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
} catch (err) {
  out.notFound = { isNotFound: err instanceof OpenAI.NotFoundError, status: err.status, code: err.code, param: err.param };
}
console.log(JSON.stringify(out));
