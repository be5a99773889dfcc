// The real e2b JS SDK against Ember: a sandbox's life, commands (with the
// end-of-stream frame the JS SDK requires and errors inside streams), files,
// watches (WatchDir stream), ports and kill. Run with `node --input-type=module`
// from the SDK's directory; E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY set.
// Prints one line per step; any failure throws (non-zero exit).

import assert from 'node:assert/strict'
import { Sandbox, CommandExitError, NotFoundError } from 'e2b'

const step = (name) => console.log(`ok ${name}`)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

const sb = await Sandbox.create('base', { metadata: { lang: 'js' }, envs: { FROM_CREATE: 'yes' }, timeoutMs: 120_000 })
try {
  const info = await sb.getInfo()
  assert.equal(info.sandboxId, sb.sandboxId)
  assert.deepEqual(info.metadata, { lang: 'js' })
  step(`create ${sb.sandboxId}`)

  const r = await sb.commands.run('echo hello; echo err >&2; echo $FROM_CREATE')
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'hello\nyes\n')
  assert.equal(r.stderr, 'err\n')
  await assert.rejects(sb.commands.run('exit 7'), (e) => e instanceof CommandExitError && e.exitCode === 7)
  step('commands')

  // The base template: sudo without a password, a root code may write to.
  const root = await sb.commands.run("sudo -n sh -c 'echo from-js > /opt/js-mark' && cat /opt/js-mark && id -un")
  assert.equal(root.stdout, 'from-js\nember\n')
  step('sudo and a writable root')

  const bg = await sb.commands.run('sleep 60', { background: true })
  const listed = await sb.commands.list()
  assert.ok(listed.some((p) => p.pid === bg.pid), JSON.stringify(listed))
  assert.equal(await bg.kill(), true)
  assert.equal(await sb.commands.kill(bg.pid), false)
  await assert.rejects(sb.commands.connect(999_999), (e) => e instanceof NotFoundError)
  step('background, kill, connect to an unknown pid')

  await sb.files.write('js/hello.txt', 'from js\n')
  assert.equal(await sb.files.read('js/hello.txt'), 'from js\n')
  const entries = await sb.files.list('js')
  assert.deepEqual(entries.map((e) => e.name), ['hello.txt'])
  assert.equal(await sb.files.exists('js/nope'), false)
  await assert.rejects(sb.files.read('js/nope'), (e) => e instanceof NotFoundError)
  step('files')

  const events = []
  const handle = await sb.files.watchDir('js', (e) => events.push(e))
  await sb.files.write('js/watched.txt', 'w')
  for (let i = 0; i < 75 && !events.some((e) => e.name === 'watched.txt'); i++) await sleep(200)
  await handle.stop()
  assert.ok(events.some((e) => e.name === 'watched.txt'), JSON.stringify(events))
  step('watchDir stream')

  const pty = await sb.pty.create({ cols: 80, rows: 24, onData: () => {} })
  await sb.pty.resize(pty.pid, { cols: 100, rows: 30 })
  await sb.pty.kill(pty.pid)
  step('pty')

  assert.ok(sb.getHost(8000).startsWith(`8000-${sb.sandboxId}.`))
  step('getHost')
} finally {
  await sb.kill()
}
assert.equal(await Sandbox.kill(sb.sandboxId), false)
step('done')
