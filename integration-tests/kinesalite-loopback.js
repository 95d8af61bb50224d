// Preloaded with `node -r` in front of kinesalite's cli.js.
//
// kinesalite has no flag for the listen address and calls
// `server.listen(port, callback)`, which binds every interface. The servers
// our tests and the quickstart start must be reachable from this machine
// only, so this rewrites the host of every TCP listen in the process to
// 127.0.0.1. Unix-socket paths and inherited handles are left alone.
'use strict'

const net = require('net')

const LOOPBACK = '127.0.0.1'
const originalListen = net.Server.prototype.listen

function isPort(value) {
  return typeof value === 'number' || (typeof value === 'string' && /^\d+$/.test(value))
}

net.Server.prototype.listen = function listenOnLoopback(...args) {
  const first = args[0]
  if (isPort(first) || first === undefined || typeof first === 'function') {
    // listen([port][, host][, backlog][, callback])
    if (first === undefined || typeof first === 'function') args.unshift(0)
    if (typeof args[1] === 'string') args[1] = LOOPBACK
    else args.splice(1, 0, LOOPBACK)
  } else if (first !== null && typeof first === 'object' && first.path === undefined &&
             first.fd === undefined && first._handle === undefined && first.handle === undefined) {
    // listen(options[, callback]) with a TCP port
    args[0] = Object.assign({}, first, { host: LOOPBACK })
  }
  return originalListen.apply(this, args)
}
