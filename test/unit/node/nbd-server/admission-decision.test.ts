import { describe, expect, it } from 'vitest';
import {
  decideAdmission,
  type ConnectingClient,
  type FileAtPath,
} from '../../../../src/node/nbd-server/admission-decision.js';
import type { AdmissionRules } from '../../../../src/node/nbd-server/admission-rules.js';

const RULES: AdmissionRules = {
  exportName: 'vm-1-disk0',
  path: '/srv/images/vm-1/disk0.raw',
  fileId: '64768:131',
  allowedClients: ['10.20.0.0/16', 'fd00::/8'],
  maxConnections: 2,
};
const CHECKED: FileAtPath = { kind: 'file', fileId: '64768:131', nlink: 1 };
const inside: ConnectingClient = { kind: 'remote', address: '10.20.3.4' };
const controller: ConnectingClient = { kind: 'controller' };

describe('decideAdmission', () => {
  it.each<[string, AdmissionRules, ConnectingClient, FileAtPath, number, ReturnType<typeof decideAdmission>]>(
    [
      ['a client in the list, under the limit', RULES, inside, CHECKED, 1, { admit: true, counted: true }],
      [
        'an IPv6 client in the list',
        RULES,
        { kind: 'remote', address: 'fd00::7' },
        CHECKED,
        0,
        { admit: true, counted: true },
      ],
      [
        'any client when the list is empty',
        { ...RULES, allowedClients: [] },
        { kind: 'remote', address: '203.0.113.9' },
        CHECKED,
        0,
        { admit: true, counted: true },
      ],
      [
        'the controller, outside the list and at the limit',
        RULES,
        controller,
        CHECKED,
        2,
        { admit: true, counted: false },
      ],
      [
        'a block device (no link count to judge)',
        RULES,
        inside,
        { kind: 'block-device', fileId: '64768:131', nlink: 3 },
        0,
        { admit: true, counted: true },
      ],
      [
        'rules from before file identities',
        { exportName: RULES.exportName, path: RULES.path, allowedClients: [], maxConnections: 2 },
        inside,
        { kind: 'file', fileId: '1:2', nlink: 1 },
        0,
        { admit: true, counted: true },
      ],
    ],
  )('admits %s', (_, rules, client, file, servedNow, expected) => {
    expect(decideAdmission(rules, client, file, servedNow)).toEqual(expected);
  });

  it.each<[string, AdmissionRules, ConnectingClient, FileAtPath, number, RegExp]>([
    [
      'a client outside the list',
      RULES,
      { kind: 'remote', address: '10.21.0.1' },
      CHECKED,
      0,
      /10\.21\.0\.1 is not in allowedClients \(10\.20\.0\.0\/16, fd00::\/8\)/,
    ],
    [
      'a loopback client the list does not name',
      RULES,
      { kind: 'remote', address: '127.0.0.1' },
      CHECKED,
      0,
      /not in allowedClients/,
    ],
    [
      'a client at the limit',
      RULES,
      inside,
      CHECKED,
      2,
      /2 client\(s\) already connected; maxConnections is 2/,
    ],
    [
      'a client nobody can identify',
      RULES,
      { kind: 'unidentified', problem: '0 connected TCP sockets' },
      CHECKED,
      0,
      /cannot tell who the client is/,
    ],
    [
      'the controller, when the path names another file',
      RULES,
      controller,
      { kind: 'file', fileId: '64768:999', nlink: 1 },
      0,
      /names another file \(64768:999\) than the one the controller checked \(64768:131\)/,
    ],
    ['a client, when the path is now a symlink', RULES, inside, { kind: 'symlink' }, 0, /is now a symlink/],
    ['a client, when the file is gone', RULES, controller, { kind: 'missing' }, 0, /is gone/],
    [
      'a client, when the path is a directory or FIFO now',
      RULES,
      inside,
      { kind: 'other', fileId: '64768:131', nlink: 1 },
      0,
      /neither a regular file nor a block device/,
    ],
    [
      'a client, when the file gained a hard link',
      RULES,
      controller,
      { kind: 'file', fileId: '64768:131', nlink: 2 },
      0,
      /2 hard links/,
    ],
  ])('refuses %s', (_, rules, client, file, servedNow, reason) => {
    const decision = decideAdmission(rules, client, file, servedNow);
    expect(decision.admit).toBe(false);
    if (!decision.admit) expect(decision.reason).toMatch(reason);
  });
});
