import { describe, expect, it } from 'vitest';
import {
  parseAdmissionRules,
  renderAdmissionRules,
  type AdmissionRules,
} from '../../../../src/node/nbd-server/admission-rules.js';
import { HEADER_PREFIX, isOurs } from '../../../../src/node/nbd-server/render-export-config.js';

const RULES: AdmissionRules = {
  exportName: 'ns.vm-1',
  path: '/srv/vm-1.raw',
  fileId: '64768:131',
  allowedClients: ['10.0.0.0/8', '192.0.2.7', 'fd00::/8'],
  maxConnections: 3,
};
const FIRST_LINE = `${HEADER_PREFIX}admission rules; generated, do not edit`;

describe('admission rules', () => {
  it('read back what was written, and are marked as ours', () => {
    const text = renderAdmissionRules(RULES);
    expect(isOurs(text)).toBe(true);
    expect(parseAdmissionRules(text)).toEqual(RULES);
    const { fileId: _fileId, ...withoutFileId } = RULES;
    expect(parseAdmissionRules(renderAdmissionRules(withoutFileId))).toEqual(withoutFileId);
  });

  const line = (value: unknown) => `${FIRST_LINE}\n${JSON.stringify(value)}\n`;
  it.each([
    ['an empty file', ''],
    ['another header', `# hello\n${JSON.stringify(RULES)}\n`],
    ['broken JSON', `${FIRST_LINE}\n{nope\n`],
    ['no JSON line', `${FIRST_LINE}\n`],
    ['a relative path', line({ ...RULES, path: 'srv/x.raw' })],
    ['a CIDR that is not one', line({ ...RULES, allowedClients: ['10.0.0.0/8 # all'] })],
    ['a hostname for a client', line({ ...RULES, allowedClients: ['backup.example'] })],
    ['allowedClients that is not a list', line({ ...RULES, allowedClients: '10.0.0.0/8' })],
    ['a limit of 0', line({ ...RULES, maxConnections: 0 })],
    ['a fractional limit', line({ ...RULES, maxConnections: 1.5 })],
    ['a file id that is not dev:ino', line({ ...RULES, fileId: '../x' })],
    ['a JSON array', line([RULES])],
  ])('are refused (the hook then refuses every client) for %s', (_, text) => {
    expect(parseAdmissionRules(text)).toBeUndefined();
  });
});
