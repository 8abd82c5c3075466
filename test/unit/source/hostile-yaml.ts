/** YAML that attacks its reader, for the directory source's tests. */

/**
 * The classic "billion laughs": `levels` levels of `width` aliases each, width^levels "lol"s
 * when expanded. The default (9 × 9, 72 aliases) is well under 1 KiB.
 */
export function aliasBomb(levelCount = 9, width = 9): string {
  const levels = 'abcdefghijklmnop'.slice(0, levelCount).split('');
  let text = 'apiVersion: nbd.dev/v1alpha1\nkind: NbdExport\nmetadata: { name: bomb, namespace: backups }\n';
  text += `a: &a [${Array(width).fill('"lol"').join(',')}]\n`;
  for (let i = 1; i < levels.length; i++)
    text += `${levels[i]}: &${levels[i]} [${Array(9)
      .fill(`*${levels[i - 1]}`)
      .join(',')}]\n`;
  return text;
}
