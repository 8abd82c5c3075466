/**
 * A client host of its own for tests: a network namespace joined to this one by a veth pair
 * on a /30 of 10.254.0.0/16 (a range this machine does not use: its own network is
 * 192.0.2.0/24 and the test node's 10.244.0.0/24) and a /126 of a ULA no address here is in.
 * A program run through `argv()` connects from `clientAddress` (or `clientAddress6`), as a
 * remote client would, and reaches this host at `hostAddress` (or `hostAddress6`).
 */
import { execa } from 'execa';

export class NetworkNamespace {
  readonly name: string;
  /** This host's end of the pair: servers listen here. */
  readonly hostAddress: string;
  /** The namespace's end: where its clients connect from. */
  readonly clientAddress: string;
  /** Both ends, as a CIDR. */
  readonly subnet: string;
  readonly hostAddress6: string;
  readonly clientAddress6: string;
  readonly subnet6: string;
  readonly #hostLink: string;

  private constructor(name: string, hostLink: string, third: number, last: number) {
    this.name = name;
    this.#hostLink = hostLink;
    const base = `10.254.${third}`;
    this.hostAddress = `${base}.${last + 1}`;
    this.clientAddress = `${base}.${last + 2}`;
    this.subnet = `${base}.${last}/30`;
    const base6 = `fd62:6478:6677:${third.toString(16)}::${last.toString(16)}`;
    this.subnet6 = `${base6}/126`;
    this.hostAddress6 = `fd62:6478:6677:${third.toString(16)}::${(last + 1).toString(16)}`;
    this.clientAddress6 = `fd62:6478:6677:${third.toString(16)}::${(last + 2).toString(16)}`;
  }

  /** Creates the namespace on a /30 no address of this host is in; bounded tries. */
  static async create(): Promise<NetworkNamespace> {
    const used = (await execa('ip', ['-o', 'addr'])).stdout;
    for (let attempt = 0; attempt < 20; attempt++) {
      const third = 1 + Math.floor(Math.random() * 250);
      const last = 4 * Math.floor(Math.random() * 60);
      const base = `10.254.${third}`;
      if (used.includes(`${base}.${last + 1}/`) || used.includes(`${base}.${last + 2}/`)) continue;
      const tag = `${process.pid.toString(36)}${attempt}`.slice(-6);
      const namespace = new NetworkNamespace(`nbdx-t${tag}`, `nbdx${tag}h`, third, last);
      await namespace.#setUp(`nbdx${tag}c`);
      return namespace;
    }
    throw new Error('no free /30 in 10.254.0.0/16 after 20 tries');
  }

  /** The command line that runs `argv` inside the namespace. */
  argv(argv: readonly string[]): string[] {
    return ['ip', 'netns', 'exec', this.name, ...argv];
  }

  /** Runs `argv` inside the namespace to completion; throws with its stderr when it fails. */
  async run(argv: readonly string[]): Promise<string> {
    const [program = 'ip', ...args] = this.argv(argv);
    return (await execa(program, args, { timeout: 60_000 })).stdout;
  }

  async destroy(): Promise<void> {
    await execa('ip', ['link', 'del', this.#hostLink], { reject: false });
    await execa('ip', ['netns', 'del', this.name], { reject: false });
  }

  async #setUp(clientLink: string): Promise<void> {
    const ip = (...args: string[]) => execa('ip', args);
    const inside = (...args: string[]) => execa('ip', ['netns', 'exec', this.name, 'ip', ...args]);
    try {
      await this.destroy(); // a run with the same pid that was killed before its afterAll
      await ip('netns', 'add', this.name);
      await ip('link', 'add', this.#hostLink, 'type', 'veth', 'peer', 'name', clientLink);
      await ip('link', 'set', clientLink, 'netns', this.name);
      await ip('addr', 'add', `${this.hostAddress}/30`, 'dev', this.#hostLink);
      // nodad: the address is usable at once, not after duplicate address detection.
      await ip('-6', 'addr', 'add', `${this.hostAddress6}/126`, 'dev', this.#hostLink, 'nodad');
      await ip('link', 'set', this.#hostLink, 'up');
      await inside('addr', 'add', `${this.clientAddress}/30`, 'dev', clientLink);
      await inside('-6', 'addr', 'add', `${this.clientAddress6}/126`, 'dev', clientLink, 'nodad');
      await inside('link', 'set', clientLink, 'up');
      await inside('link', 'set', 'lo', 'up');
    } catch (error) {
      await this.destroy();
      throw error;
    }
  }
}
