<?php
// What Nextcloud does to its data directory, one operation per request, answered in JSON.
// Driven by tests/webapp.rs; DATA is the s3bridge mount (owned by www-data, mode 0770).
header('Content-Type: application/json');
$data = getenv('S3BRIDGE_DATA') ?: $_SERVER['S3BRIDGE_DATA'];
$op = $_GET['op'] ?? '';
$path = isset($_GET['path']) ? $data . '/' . $_GET['path'] : $data;
clearstatcache();
switch ($op) {
case 'check':
    // Nextcloud's setup checks on its data directory.
    $out = [
        'owner' => fileowner($data),
        'group' => filegroup($data),
        'mode' => sprintf('%o', fileperms($data) & 0777),
        'writable' => is_writable($data),
        'free' => disk_free_space($data),
        'whoami' => posix_getpwuid(posix_geteuid())['name'],
    ];
    break;
case 'mkdir':
    $out = ['ok' => mkdir($path, 0770, true)];
    break;
case 'chunk':
    // A chunked upload: each chunk appended to NAME.part, as the web client sends them.
    $f = fopen($path . '.part', $_GET['index'] === '0' ? 'w' : 'a');
    $n = fwrite($f, file_get_contents('php://input'));
    $out = ['written' => $n, 'closed' => fclose($f)];
    break;
case 'finish':
    $out = ['ok' => rename($path . '.part', $path), 'size' => filesize($path)];
    break;
case 'patch':
    // Overwrite bytes in place: fopen with r+.
    $f = fopen($path, 'r+');
    fseek($f, (int)$_GET['offset']);
    $n = fwrite($f, file_get_contents('php://input'));
    $out = ['written' => $n, 'closed' => fclose($f)];
    break;
case 'append':
    $f = fopen($path, 'a');
    $n = fwrite($f, file_get_contents('php://input'));
    $out = ['written' => $n, 'closed' => fclose($f)];
    break;
case 'touch':
    $t = (int)$_GET['mtime'];
    $ok = touch($path, $t);
    clearstatcache();
    $out = ['ok' => $ok, 'mtime' => filemtime($path)];
    break;
case 'scandir':
    $out = ['entries' => array_values(array_diff(scandir($path), ['.', '..']))];
    break;
case 'read':
    $out = ['body' => base64_encode(file_get_contents($path)), 'size' => filesize($path)];
    break;
case 'unlink':
    $out = ['ok' => unlink($path), 'exists' => file_exists($path)];
    break;
default:
    http_response_code(400);
    $out = ['error' => "unknown op $op"];
}
echo json_encode($out);
