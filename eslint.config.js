// Lint rules, including the layering the design asks for:
//   shared/ (clock, backoff, atomic files, deadlines: one definition each) and api/ import nothing
//   of ours; plan/ imports only api/; node/ and kube/ never import each other;
//   source/ feeds desired state and imports api/ only; controller/ glues; main.ts wires.
import tseslint from 'typescript-eslint';

const layer = (files, forbidden) => ({
  files,
  rules: {
    // Type-only imports are allowed: a layer may implement an interface declared by the one that uses it.
    '@typescript-eslint/no-restricted-imports': [
      'error',
      {
        patterns: forbidden.map((dir) => ({
          group: [`**/${dir}/*`],
          message: `this layer may not import ${dir}/`,
          allowTypeImports: true,
        })),
      },
    ],
  },
});

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', '.tools/**', '.cache/**', 'hack/controlplane/**'] },
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: {
        projectService: { allowDefaultProject: ['*.mjs', 'bench/*.mjs'] },
        tsconfigRootDir: import.meta.dirname,
      },
    },
    rules: {
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/consistent-type-imports': 'error',
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      eqeqeq: ['error', 'always'],
    },
  },
  { files: ['eslint.config.js', '**/*.mjs'], ...tseslint.configs.disableTypeChecked },
  layer(['src/shared/**'], ['api', 'plan', 'node', 'kube', 'source', 'controller']),
  layer(['src/api/**'], ['plan', 'node', 'kube', 'source', 'controller']),
  layer(['src/plan/**'], ['node', 'kube', 'source', 'controller']),
  layer(['src/node/**'], ['plan', 'kube', 'source', 'controller']),
  layer(['src/kube/**'], ['plan', 'node', 'source', 'controller']),
  layer(['src/source/**'], ['plan', 'node', 'kube', 'controller']),
);
